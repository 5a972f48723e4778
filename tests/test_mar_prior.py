import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tfflows.distributions.mar_prior import MARPrior, marps_num_steps, normal_log_prob
from tfflows.nn.conv_lstm import ConvLSTMStack

tfd = tfp.distributions

H, W, CL, CR = 4, 4, 3, 2


def _prior(context_channels=CR, channels=CL, dilation=1):
  """A small prior whose zero-initialised head is replaced by random weights."""
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


def test_log_prob_is_normalised_at_init():
  """With the zero-initialised head the prior is N(0, I)."""
  prior = MARPrior(CL, H, W, CR, hidden=8, num_layers=2, kernel_size=3)
  l = _normal([2, H, W, CL])
  expected = tf.reduce_sum(tfd.Normal(0., 1.).log_prob(l), axis=[1, 2, 3])
  np.testing.assert_allclose(prior.log_prob(l, _normal([2, H, W, CR])), expected, rtol=1e-5)


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
  assert sum('cell' in n for n in names) == 2 * 3  # 2 layers x (W_x, W_h, b)
  assert isinstance(prior.lstm, keras.layers.Layer)
