import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfflows.distributions.mar_prior import MARPrior, marps_num_steps, normal_log_prob
from tfflows.nn import conv_lstm, torch_init
from tfflows.nn.conv_lstm import ConvLSTMStack, dilated_conv2d

tfd = tfp.distributions

H, W, CL, CR = 4, 4, 3, 2


def _prior(context_channels=CR, channels=CL, dilation=1):
  """A small prior whose head has larger random weights than its initialisation."""
  prior = MARPrior(channels, H, W, context_channels, hidden=8, num_layers=2, kernel_size=3,
                   dilation=dilation, embed_channels=2)
  kernel = prior.head.kernel
  prior.head.kernel.assign(tf.random.normal(kernel.shape, stddev=0.3, dtype=kernel.dtype))
  prior.head.bias.assign(tf.constant([0.2, -0.3], kernel.dtype))
  return prior


def _normal(shape, dtype=tf.float32):
  return tf.random.normal(shape, dtype=dtype)


# -- step count -----------------------------------------------------------------------------
def test_marps_num_steps():
  assert marps_num_steps(3, 3) == 66  # 32x32x3, L = 3
  assert marps_num_steps(4, 3) == 138  # 64x64x3, L = 4
  for levels in (1, 2, 3, 4, 5):  # against the explicit per-level channel counts
    counts = [2 ** i * 3 for i in range(1, levels)] + [2 ** (levels + 1) * 3]
    assert marps_num_steps(levels, 3) == sum(counts)
  with pytest.raises(ValueError):
    marps_num_steps(0, 3)


# -- ConvLSTM -------------------------------------------------------------------------------
@pytest.mark.parametrize('dilation', [1, 2])
def test_conv_lstm_sequence_equals_steps(float64, dilation):
  stack = ConvLSTMStack(hidden=6, num_layers=3, kernel_size=3, dilation=dilation)
  seq = _normal([2, 5, H, W, 3], tf.float64)
  out = stack(seq)
  assert out.shape == (2, 5, H, W, 6)
  state = stack.initial_state(2, H, W)
  for t in range(5):
    out_t, state = stack.step(seq[:, t], state)
    np.testing.assert_allclose(out_t, out[:, t], atol=1e-12)


def test_conv_lstm_unknown_batch_xla():
  stack = ConvLSTMStack(hidden=4, num_layers=2, kernel_size=3, dilation=2)
  seq = _normal([3, 4, H, W, 2])
  eager = stack(seq)
  spec = tf.TensorSpec([None, 4, H, W, 2])
  xla = tf.function(lambda s: stack(s), input_signature=[spec], jit_compile=True)(seq)
  np.testing.assert_allclose(xla, eager, atol=1e-5)


# -- dilated convolution ---------------------------------------------------------------------
def _zero_inserted(kernel, r):
  """The dilated kernel written out: r - 1 zeros between taps, extent r (k - 1) + 1."""
  k, _, cin, cout = kernel.shape
  spread = tf.pad(kernel[:, None, :, None], [[0, 0], [0, r - 1], [0, 0], [0, r - 1], [0, 0],
                                             [0, 0]])
  extent = r * (k - 1) + 1
  return tf.reshape(spread, [k * r, k * r, cin, cout])[:extent, :extent]


def _reference_conv(x, kernel, r):
  """Ordinary (undilated) 'same' convolution with the zero-inserted kernel: the dilated
  convolution by definition, with a gradient on every kernel set."""
  return tf.nn.conv2d(x, _zero_inserted(kernel, r), strides=1, padding='SAME')


def _numpy_dilated_conv(x, kernel, r):
  """The formula of dilated_conv2d's docstring, one tap at a time."""
  k = kernel.shape[0]
  a = r * (k - 1) // 2
  n, h, w, _ = x.shape
  padded = np.pad(x, [(0, 0), (a, r * (k - 1) - a), (a, r * (k - 1) - a), (0, 0)])
  y = np.zeros([n, h, w, kernel.shape[-1]])
  for i in range(k):
    for j in range(k):
      y += padded[:, r * i:r * i + h, r * j:r * j + w] @ kernel[i, j]
  return y


def _value_and_grads(conv, x, kernel, r, cotangent):
  with tf.GradientTape() as tape:
    tape.watch([x, kernel])
    y = conv(x, kernel, r)
    loss = tf.reduce_sum(y * cotangent)
  return (y,) + tuple(tape.gradient(loss, [x, kernel]))


# (kernel size, rate, H, W): sizes not divisible by the rate, an even kernel, a dilated extent
# larger than the image, and rate 1.
@pytest.mark.parametrize('k, r, height, width', [(5, 2, 7, 5), (3, 3, 8, 4), (4, 2, 5, 6),
                                                 (5, 3, 4, 5), (3, 1, 3, 3)])
def test_dilated_conv_equals_dilated_convolution(float64, k, r, height, width):
  """Values equal the docstring's formula and tf.nn.conv2d(dilations=r) (whose forward exists
  on every CPU); values and gradients equal the zero-inserted kernel's ordinary convolution."""
  x, kernel = _normal([2, height, width, 3], tf.float64), _normal([k, k, 3, 4], tf.float64)
  cotangent = _normal([2, height, width, 4], tf.float64)
  y, dx, dk = _value_and_grads(dilated_conv2d, x, kernel, r, cotangent)
  assert y.shape == (2, height, width, 4)
  np.testing.assert_allclose(y, _numpy_dilated_conv(x.numpy(), kernel.numpy(), r), atol=1e-12)
  native = tf.nn.conv2d(x, kernel, strides=1, padding='SAME', dilations=r)
  np.testing.assert_allclose(y, native, atol=1e-12)
  for ours, ref in zip((y, dx, dk), _value_and_grads(_reference_conv, x, kernel, r, cotangent)):
    np.testing.assert_allclose(ours, ref, atol=1e-12)
  with pytest.raises(ValueError, match='dilation'):
    dilated_conv2d(x, kernel, 0)


def test_dilated_conv_xla_unknown_batch_and_gradients():
  x, kernel, cotangent = _normal([3, 7, 5, 2]), _normal([5, 5, 2, 4]), _normal([3, 7, 5, 4])
  spec = [tf.TensorSpec([None, 7, 5, 2]), tf.TensorSpec([5, 5, 2, 4]),
          tf.TensorSpec([None, 7, 5, 4])]
  xla = tf.function(lambda a, b, c: _value_and_grads(dilated_conv2d, a, b, 2, c),
                    input_signature=spec, jit_compile=True)(x, kernel, cotangent)
  for ours, ref in zip(xla, _value_and_grads(_reference_conv, x, kernel, 2, cotangent)):
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-5)


def test_conv_lstm_dilated_gradients_equal_reference(float64, monkeypatch):
  """The whole stack at dilation 2 on a 7x5 grid: output and weight gradients equal those of
  the stack computed with the zero-inserted reference convolution; the kernels keep the
  layout of a tf.nn.conv2d kernel, and each convolution has its own bias."""
  stack = ConvLSTMStack(hidden=4, num_layers=2, kernel_size=5, dilation=2)
  seq = _normal([2, 3, 7, 5, 2], tf.float64)

  def run():
    with tf.GradientTape() as tape:
      out = stack(seq)
      loss = tf.reduce_sum(out * tf.cos(out))
    return [out] + tape.gradient(loss, stack.trainable_weights)

  ours = run()
  monkeypatch.setattr(conv_lstm, 'dilated_conv2d', _reference_conv)
  for a, b in zip(ours, run()):
    np.testing.assert_allclose(a, b, atol=1e-12)
  assert [(w.name, tuple(w.shape)) for w in stack.cells[1].weights] == [
      ('input_kernel', (5, 5, 4, 16)), ('recurrent_kernel', (5, 5, 4, 16)),
      ('input_bias', (16,)), ('recurrent_bias', (16,))]


_WITHOUT_ONEDNN = """
import numpy as np, tensorflow as tf
from tfflows.distributions.mar_prior import MARPrior
prior = MARPrior(2, 7, 5, 3, hidden=4, num_layers=2, kernel_size=5, dilation=2, embed_channels=2)
l, r = tf.random.normal([2, 7, 5, 2]), tf.random.normal([2, 7, 5, 3])
with tf.GradientTape() as tape:
  loss = -tf.reduce_mean(prior.log_prob(l, r))
grads = tape.gradient(loss, prior.trainable_weights)
assert all(np.all(np.isfinite(g)) for g in grads)
print('ok', len(grads))
"""


def test_dilated_prior_trains_without_onednn():
  """TensorFlow's plain CPU kernels (oneDNN off, as on CPUs without AVX512-VNNI/BF16 or AMX)
  have no gradient of tf.nn.conv2d with dilations > 1; the prior's gradient must exist there.
  The switch is read once per process, hence a subprocess."""
  env = {**os.environ, 'TF_ENABLE_ONEDNN_OPTS': '0', 'CUDA_VISIBLE_DEVICES': '',
         'TF_CPP_MIN_LOG_LEVEL': '2'}
  result = subprocess.run([sys.executable, '-c', _WITHOUT_ONEDNN], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # 2 cells x (W_x, W_h, b_x, b_h), embed 2 x (kernel, bias), input conv and head likewise
  assert result.stdout.split()[-2:] == ['ok', str(2 * 4 + 4 + 2 + 2)]


# -- density -------------------------------------------------------------------------------
@pytest.mark.parametrize('context_channels', [CR, None])
def test_log_prob_equals_sequential_conditionals(float64, context_channels):
  prior = _prior(context_channels)
  l = _normal([2, H, W, CL], tf.float64)
  r = None if context_channels is None else _normal([2, H, W, CR], tf.float64)
  embedded = prior.embed_context(r)
  state = prior.lstm.initial_state(2, H, W)
  prev, total = tf.zeros_like(l[..., :1]), 0.
  for j in range(CL):
    mu, log_sigma, state = prior.step(prev, embedded, state)
    total += tf.reduce_sum(normal_log_prob(l[..., j:j + 1], mu, log_sigma), axis=[1, 2, 3])
    prev = l[..., j:j + 1]
  np.testing.assert_allclose(prior.log_prob(l, r), total, rtol=1e-10)
  assert prior.num_sequential_steps == CL


def test_log_prob_with_a_zero_head_is_standard_normal():
  """With a zero head (mu = 0, log sigma = 0) the prior is N(0, I)."""
  prior = MARPrior(CL, H, W, CR, hidden=8, num_layers=2, kernel_size=3)
  prior.head.kernel.assign(tf.zeros_like(prior.head.kernel))
  prior.head.bias.assign(tf.zeros_like(prior.head.bias))
  l = _normal([2, H, W, CL])
  expected = tf.reduce_sum(tfd.Normal(0., 1.).log_prob(l), axis=[1, 2, 3])
  np.testing.assert_allclose(prior.log_prob(l, _normal([2, H, W, CR])), expected, rtol=1e-5)


def test_initialisation_follows_the_official_prior():
  """The official mAR-SCF prior's initialisation (PyTorch's): every ConvLSTM weight, both
  biases included, ~ U(-1/sqrt(h), 1/sqrt(h)); the input conv (k x k to h channels, applied to
  [l^(j-1), embed(r)]), the head and the embedding convs with PyTorch's conv default."""
  keras.utils.set_random_seed(0)
  hidden = 16
  prior = MARPrior(CL, H, W, CR, hidden=hidden, num_layers=2, kernel_size=5, embed_channels=4)
  bound = 1. / np.sqrt(hidden)
  for cell in prior.lstm.cells:
    for w in cell.weights:
      values = w.numpy()
      assert np.abs(values).max() <= bound and np.abs(values).max() > 0.8 * bound
  assert tuple(prior.input_conv.kernel.shape) == (5, 5, 1 + 4, hidden)
  convs = [prior.input_conv, prior.head] + [l for l in prior.embed.layers]
  assert all(isinstance(c, torch_init.Conv2D) for c in convs)
  assert np.any(prior.head.kernel.numpy())


def test_context_embedding_computes_in_the_model_dtype():
  """embed(r) runs its convolutions in the dtype policy's dtype: under a float64 policy (with
  Keras' floatx left at float32) a float64 context is not rounded to float32 on the way in, as
  a keras.Input of the default dtype would do."""
  keras.config.set_dtype_policy('float64')
  try:
    prior = _prior()
  finally:
    keras.config.set_dtype_policy('float32')
  r = 1. + 1e-3 * _normal([2, H, W, CR], tf.float64)
  conv1, conv2 = prior.embed.layers
  np.testing.assert_allclose(prior.embed_context(r), conv2(conv1(r)), rtol=1e-14, atol=0)


# -- sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize('context_channels', [CR, None])
def test_sample_shape_and_finite_density(context_channels):
  prior = _prior(context_channels)
  r = None if context_channels is None else _normal([5, H, W, CR])
  l = prior.sample(r, batch_size=5, temperature=0.8, seed=3)
  assert l.shape == (5, H, W, CL)
  lp = prior.log_prob(l, r)
  assert lp.shape == (5,) and np.all(np.isfinite(lp))
  np.testing.assert_array_equal(prior.sample(r, batch_size=5, temperature=0.8, seed=3), l)


def test_temperature_zero_gives_conditional_means():
  prior = _prior()
  r = _normal([3, H, W, CR])
  l = prior.sample(r, temperature=0., seed=1)
  mu, _ = prior.conditional_params(l, r)
  np.testing.assert_allclose(l, mu, atol=1e-6)
  assert np.std(l.numpy()) > 1e-3  # the means are not trivially zero


def test_sample_temperature_scales_spread():
  prior = _prior()
  r = tf.repeat(_normal([1, H, W, CR]), 400, axis=0)
  hot = prior.sample(r, temperature=1., seed=2)
  cold = prior.sample(r, temperature=0.5, seed=2)
  # channel 1 has no autoregressive input: its spread is exactly temperature * sigma.
  ratio = np.std(cold[..., 0], axis=0) / np.std(hot[..., 0], axis=0)
  np.testing.assert_allclose(ratio, 0.5, rtol=1e-4)


# -- tf.function / XLA ---------------------------------------------------------------------
@pytest.mark.parametrize('jit_compile', [False, True])
def test_unknown_batch(jit_compile):
  prior = _prior(dilation=2)
  l, r = _normal([3, H, W, CL]), _normal([3, H, W, CR])
  specs = [tf.TensorSpec([None, H, W, CL]), tf.TensorSpec([None, H, W, CR])]
  log_prob = tf.function(prior.log_prob, input_signature=specs, jit_compile=jit_compile)
  np.testing.assert_allclose(log_prob(l, r), prior.log_prob(l, r), rtol=1e-5)
  sample = tf.function(lambda c: prior.sample(c, seed=7), input_signature=specs[1:],
                       jit_compile=jit_compile)
  np.testing.assert_allclose(sample(r), prior.sample(r, seed=7), atol=1e-5)


def test_gradients_under_xla():
  prior = _prior()
  l, r = _normal([3, H, W, CL]), _normal([3, H, W, CR])

  def grads(a, b):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(prior.log_prob(a, b))
    return tape.gradient(loss, prior.trainable_weights)

  specs = [tf.TensorSpec([None, H, W, CL]), tf.TensorSpec([None, H, W, CR])]
  xla = tf.function(grads, input_signature=specs, jit_compile=True)(l, r)
  for g_xla, g in zip(xla, grads(l, r)):
    np.testing.assert_allclose(g_xla, g, atol=1e-4, rtol=1e-4)
  assert all(float(tf.reduce_sum(tf.abs(g))) > 0. for g in xla)


def test_unconditional_sample_xla():
  prior = _prior(None)
  sample = tf.function(lambda: prior.sample(batch_size=4, temperature=0.7, seed=5),
                       jit_compile=True)
  np.testing.assert_allclose(sample(), prior.sample(batch_size=4, temperature=0.7, seed=5),
                             atol=1e-5)


# -- tfd.Distribution wrapper --------------------------------------------------------------
def test_distribution_shapes_with_any_leading_dims():
  prior = _prior()
  r = _normal([2, 3, H, W, CR])
  d = prior.distribution(r)
  assert d.batch_shape == [2, 3] and d.event_shape == [H, W, CL]
  l = d.sample(seed=4)
  assert l.shape == (2, 3, H, W, CL)
  lp = d.log_prob(l)
  expected = prior.log_prob(tf.reshape(l, [6, H, W, CL]), tf.reshape(r, [6, H, W, CR]))
  np.testing.assert_allclose(lp, tf.reshape(expected, [2, 3]), rtol=1e-5)
  unbatched = prior.distribution(r[0, 0])  # no batch dimension at all
  assert unbatched.batch_shape == []
  assert unbatched.log_prob(l[0, 0]).shape == ()
  assert unbatched.sample(4, seed=1).shape == (4, H, W, CL)
  expected = prior.log_prob(l[:, 1], tf.repeat(r[:1, 0], 2, axis=0))
  np.testing.assert_allclose(unbatched.log_prob(l[:, 1]), expected, rtol=1e-5)  # broadcast


def test_distribution_unconditional_and_temperature():
  prior = _prior(None)
  d = prior.distribution(temperature=0.5)
  assert d.batch_shape == [] and prior.distribution(batch_size=3).batch_shape == [3]
  l = d.sample(2, seed=0)
  assert l.shape == (2, H, W, CL)
  np.testing.assert_allclose(d.log_prob(l), prior.log_prob(l, temperature=0.5), rtol=1e-5)


def test_joint_distribution_coroutine():
  top = _prior(None, channels=CR)  # top level: unconditional prior over r
  cond = _prior(CR)  # level below: l | r

  def model():
    r = yield tfd.JointDistributionCoroutine.Root(top.distribution())
    yield cond.distribution(r)

  jd = tfd.JointDistributionCoroutine(model)
  assert [s.as_list() for s in jd.event_shape] == [[H, W, CR], [H, W, CL]]
  r, l = jd.sample(4, seed=9)
  assert r.shape == (4, H, W, CR) and l.shape == (4, H, W, CL)
  expected = top.log_prob(r) + cond.log_prob(l, r)
  np.testing.assert_allclose(jd.log_prob([r, l]), expected, rtol=1e-5)
  spec = [tf.TensorSpec([None, H, W, CR]), tf.TensorSpec([None, H, W, CL])]
  graph_lp = tf.function(lambda a, b: jd.log_prob([a, b]), input_signature=spec)
  np.testing.assert_allclose(graph_lp(r, l), expected, rtol=1e-5)
  graph_sample = tf.function(lambda: jd.sample(3, seed=2))
  r2, l2 = graph_sample()
  assert r2.shape == (3, H, W, CR) and np.all(np.isfinite(jd.log_prob([r2, l2])))


def test_keras_tracks_weights():
  prior = _prior()
  names = [w.path for w in prior.trainable_weights]
  assert len(names) == len(set(names))
  assert any('embed' in n for n in names) and any('head' in n for n in names)
  assert sum('cell' in n for n in names) == 2 * 4  # 2 layers x (W_x, W_h, b_x, b_h)
  assert isinstance(prior.lstm, keras.layers.Layer)
