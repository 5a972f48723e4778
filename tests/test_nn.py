"""Tests of the conditioner layers in tfflows.nn (small sizes; the whole file runs in ~1 min)."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfflows import nn
from tfflows.nn import torch_init

SHAPE = (2, 4, 4, 3)  # [B, H, W, C]: 16 pixel tokens


def _factories():
  """name -> (constructor, output channels, zero output at initialisation?, has BN/dropout?)."""
  return {
      'zero_conv': (lambda: nn.ZeroConv2D(5, 3), 5, True, False),
      'zero_conv1x1': (lambda: nn.zero_conv1x1(5), 5, True, False),
      'weight_norm_conv': (lambda: nn.WeightNormConv2D(5, 3), 5, False, False),
      'glow': (lambda: nn.GlowConditioner(16, 6), 6, True, False),
      'resnet': (lambda: nn.ResNetConditioner(8, 2, 6), 6, True, True),
      'dense_block': (lambda: nn.DenseBlock(2, 8), 3 + 2 * 8, False, False),
      'gated_conv': (lambda: nn.GatedConv1x1(5), 5, False, False),
      'nystrom': (lambda: nn.NystromAttention(8, num_landmarks=4, num_heads=2), 3, False, False),
      'nystrom_official': (lambda: nn.NystromAttention(8, num_landmarks=4, form='official'), 3,
                           False, False),
      'torch_conv': (lambda: torch_init.Conv2D(5, 3, padding='same'), 5, False, False),
      'denseflow': (lambda: nn.DenseFlowConditioner(6, width=16, dense_layers=2, dense_growth=8),
                    6, True, True),
      'flowpp': (lambda: nn.GatedResidualAttentionNet(6, width=16, num_blocks=1, num_heads=2),
                 6, True, True),
  }


FACTORIES = _factories()
NAMES = sorted(FACTORIES)


def _input(dtype=tf.float32):
  return tf.random.normal(SHAPE, dtype=dtype)


def _perturb_zero_weights(layer, scale=0.1):
  """Gives every all-zero trainable weight (zero-init kernels, biases, logs, g) small random
  values, so that outputs and gradients are non-trivial."""
  for w in layer.trainable_weights:
    if not np.any(w.numpy()):
      w.assign(scale * np.random.default_rng(0).normal(size=w.shape))


@pytest.mark.parametrize('name', NAMES)
def test_output_shape_and_zero_init(name):
  make, out_channels, zero_at_init, _ = FACTORIES[name]
  layer = make()
  y = layer(_input())
  assert tuple(y.shape) == SHAPE[:3] + (out_channels,)
  assert tuple(layer.compute_output_shape(SHAPE)) == SHAPE[:3] + (out_channels,)
  if zero_at_init:
    np.testing.assert_array_equal(y.numpy(), 0.)
  else:
    assert np.any(y.numpy())


@pytest.mark.parametrize('name', NAMES)
def test_xla_unknown_batch_and_gradients(name):
  """Traces with a [None, H, W, C] signature under XLA, agrees with eager inference, and every
  trainable weight gets a non-zero gradient (after the zero-init weights are perturbed)."""
  make, _, _, _ = FACTORIES[name]
  layer = make()
  x = _input()
  layer(x)
  _perturb_zero_weights(layer)
  spec = tf.TensorSpec([None] + list(SHAPE[1:]), tf.float32)
  infer = tf.function(lambda t: layer(t, training=False), input_signature=[spec],
                      jit_compile=True)
  np.testing.assert_allclose(infer(x).numpy(), layer(x, training=False).numpy(),
                             atol=1e-5, rtol=1e-4)
  assert infer(x[:1]).shape[0] == 1  # the same trace serves another batch size

  @tf.function(input_signature=[spec], jit_compile=True)
  def grads(t):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(layer(t, training=True) - 0.3))
    return tape.gradient(loss, layer.trainable_weights)

  assert layer.trainable_weights
  for w, g in zip(layer.trainable_weights, grads(x)):
    assert g is not None, w.path
    assert np.all(np.isfinite(g.numpy())), w.path
    assert np.any(g.numpy()), w.path


@pytest.mark.parametrize('name', [n for n in NAMES if FACTORIES[n][3]])
def test_training_flag(name):
  """Batch norm / dropout: training and inference differ, inference is deterministic, and only
  a training call updates the moving statistics."""
  make, _, _, _ = FACTORIES[name]
  layer = make()
  x = _input() * 2. + 1.
  layer(x)
  _perturb_zero_weights(layer)
  moving = [w for w in layer.non_trainable_weights if 'moving_mean' in w.path]
  before = [w.numpy().copy() for w in moving]
  y_inf = layer(x, training=False).numpy()
  np.testing.assert_array_equal(layer(x, training=False).numpy(), y_inf)
  for w, b in zip(moving, before):
    np.testing.assert_array_equal(w.numpy(), b)
  y_train = layer(x, training=True).numpy()
  assert np.max(np.abs(y_train - y_inf)) > 1e-4
  for w, b in zip(moving, before):
    assert np.any(w.numpy() != b), w.path


def test_training_reaches_conditioner_through_call_context():
  """Bijectors call their conditioner without a training argument; Keras' call context still
  carries the outer layer's training flag down to the batch norms."""

  class Outer(keras.layers.Layer):

    def __init__(self):
      super().__init__()
      self.net = nn.ResNetConditioner(8, 1, 6)

    def call(self, x, training=None):
      return self.net(x)  # no training argument, as in bijectors.coupling

  outer = Outer()
  x = _input() * 2. + 1.
  outer(x)
  _perturb_zero_weights(outer.net)
  np.testing.assert_array_equal(outer(x, training=True).numpy(),
                                outer.net(x, training=True).numpy())
  np.testing.assert_array_equal(outer(x, training=False).numpy(),
                                outer.net(x, training=False).numpy())


def test_float64(float64):
  for name in ('resnet', 'denseflow', 'flowpp', 'zero_conv'):
    layer = FACTORIES[name][0]()
    y = layer(_input(tf.float64))
    assert y.dtype == tf.float64
    assert all(w.dtype == 'float64' for w in layer.weights), name


@pytest.mark.parametrize('name', ['zero_conv', 'glow', 'resnet', 'nystrom', 'nystrom_official',
                                  'torch_conv', 'denseflow', 'flowpp'])
def test_get_config_round_trip(name):
  layer = FACTORIES[name][0]()
  layer(_input())
  clone = type(layer).from_config(layer.get_config())
  clone(_input())
  assert clone.count_params() == layer.count_params()


# --- Nystrom attention -------------------------------------------------------------------


def test_exact_attention_matches_numpy(float64):
  rng = np.random.default_rng(1)
  q, k, v = rng.normal(size=(5, 4)), rng.normal(size=(7, 4)), rng.normal(size=(7, 3))
  logits = q @ k.T / 2.
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(nn.exact_softmax_attention(q, k, v).numpy(), w @ v, atol=1e-12)


def test_iterative_pinv_matches_numpy(float64):
  """Softmax matrices of unit-variance 4x4 logits (condition numbers 8, 107, 19). The iteration
  converges at third order once started, and the start takes longer the worse the conditioning:
  6 iterations (DenseFlow's setting) reach 4e-6 on the cond-8 matrix but not yet the others;
  12 iterations reach round-off (< 1e-12 measured) on all three."""
  rng = np.random.default_rng(0)
  a = tf.nn.softmax(tf.constant(rng.normal(size=(3, 4, 4))), axis=-1)
  ref = np.linalg.pinv(a.numpy())
  np.testing.assert_allclose(nn.iterative_pinv(a[:1], 6).numpy(), ref[:1], atol=1e-4)
  np.testing.assert_allclose(nn.iterative_pinv(a, 12).numpy(), ref, atol=1e-10)


@pytest.mark.parametrize('num_heads', [1, 2])
def test_nystrom_equals_exact_when_landmarks_are_tokens(float64, num_heads):
  """With m = N landmarks, O = A pinv(A) A V = A V. The 16x16 attention matrices at
  initialisation are near-uniform and ill-conditioned (condition numbers 4e4 with one head, 2e6
  with two), so the pseudo-inverse needs more than DenseFlow's 6 iterations: with 30, float64
  agrees to < 1e-11 (measured 6e-13 and 6e-12; 20 iterations leave 9e-8 with two heads)."""
  layer = nn.NystromAttention(8, num_landmarks=16, pinv_iterations=30, num_heads=num_heads)
  x = _input(tf.float64)
  approx = layer(x).numpy()
  layer.exact = True
  exact = layer(x).numpy()
  np.testing.assert_allclose(approx, exact, atol=1e-9, rtol=0)


def test_nystrom_approximates_exact_with_few_landmarks():
  """Sanity: with 4 landmarks for 16 tokens the output is close in scale to exact attention but
  not identical (the approximation is used)."""
  layer = nn.NystromAttention(8, num_landmarks=4)
  x = _input()
  approx = layer(x).numpy()
  layer.exact = True
  exact = layer(x).numpy()
  assert np.all(np.isfinite(approx))
  assert 1e-6 < np.max(np.abs(approx - exact)) < 10 * np.max(np.abs(exact))


def _official_nystrom_reference(x, layer):
  """The official DenseFlow NystromAttention written out in numpy, step by step as its PyTorch
  module runs on an NCHW tensor (denseflow/nn/blocks/attention.py of the authors' code)."""
  w_qkv, b_qkv = (v.numpy()[0, 0] if v.shape.rank == 4 else v.numpy()
                  for v in (layer.qkv.kernel, layer.qkv.bias))
  w_out, b_out = layer.out.kernel.numpy()[0, 0], layer.out.bias.numpy()
  batch, h, w, c = x.shape
  n, m = h * w, layer.num_landmarks
  qkv = np.einsum('bhwc,cf->bfhw', x, w_qkv) + b_qkv[:, None, None]   # the NCHW conv output
  tokens = qkv.reshape(batch, n, -1)                                   # .reshape(N, H*W, 3E)
  q, k, v = np.split(tokens, 3, axis=-1)                               # .chunk(3, dim=-1)
  e = q.shape[-1]
  q_land = q.reshape(batch, m, n // m, e).mean(axis=-2) / np.sqrt(n)
  k_land = k.reshape(batch, m, n // m, e).mean(axis=-2) / np.sqrt(n)

  def softmax_dim_minus_2(a):
    a = np.exp(a - a.max(axis=-2, keepdims=True))
    return a / a.sum(axis=-2, keepdims=True)

  k1 = softmax_dim_minus_2(q @ k_land.transpose(0, 2, 1))
  k2 = softmax_dim_minus_2(q_land @ k_land.transpose(0, 2, 1))
  k3 = softmax_dim_minus_2(q_land @ k.transpose(0, 2, 1))
  eye = np.eye(m)
  z = k2.transpose(0, 2, 1) / (np.abs(k2).sum(-2).max(-1) * np.abs(k2).sum(-1).max(-1))[:, None,
                                                                                        None]
  for _ in range(layer.pinv_iterations):
    kz = k2 @ z
    z = (0.25 * z) @ (13 * eye - kz @ (15 * eye - kz @ (7 * eye - kz)))
  out = k1 @ z @ (k3 @ v) + v                                           # [B, N, E]
  out = out.reshape(batch, e, h, w)                                     # .reshape(N, -1, H, W)
  return np.einsum('behw,ef->bhwf', out, w_out) + b_out


def test_official_nystrom_matches_its_reference(float64):
  """form='official' computes what the authors' module computes (checked once against the
  PyTorch module itself as well: 1.8e-7 apart in float32), on an 8x8 grid whose 3E = 24
  values a token straddle channel boundaries."""
  layer = nn.NystromAttention(8, num_landmarks=4, output_channels=6, form='official')
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 5))
  got = layer(tf.constant(x)).numpy()
  np.testing.assert_allclose(got, _official_nystrom_reference(x, layer), rtol=1e-10, atol=1e-12)


def test_official_nystrom_is_not_the_published_form(float64):
  layer = nn.NystromAttention(8, num_landmarks=4, form='official')
  x = _input(tf.float64)
  official = layer(x).numpy()
  layer.form = 'published'
  assert np.max(np.abs(layer(x).numpy() - official)) > 1e-3


def test_official_nystrom_takes_one_head():
  with pytest.raises(ValueError, match='num_heads=1'):
    nn.NystromAttention(8, num_heads=2, form='official')
  with pytest.raises(ValueError, match='form='):
    nn.NystromAttention(8, form='pixels')


def test_torch_init_draws_pytorch_default_bounds():
  """Kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3 * 3 * 32 (what
  torch.nn.Conv2d.reset_parameters draws): every value inside the bound, the variance that of
  the uniform distribution, bound^2 / 3, and Keras' zero bias not used."""
  keras.utils.set_random_seed(0)
  conv = torch_init.Conv2D(256, 3)
  conv.build((None, 8, 8, 32))
  bound = 1. / np.sqrt(3 * 3 * 32)
  kernel, bias = conv.kernel.numpy(), conv.bias.numpy()
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  np.testing.assert_allclose(kernel.var(), bound ** 2 / 3, rtol=0.02)
  np.testing.assert_allclose(bias.var(), bound ** 2 / 3, rtol=0.25)
  assert np.abs(bias).max() > 0.9 * bound
  with pytest.raises(ValueError, match='kernel_initializer'):
    torch_init.Conv2D(4, 1, kernel_initializer='zeros')


def test_denseflow_networks_initialise_as_the_official_code():
  """Every convolution of the coupling network has PyTorch's default initialisation but the
  zero-initialised output; the 2w -> w convolution after batch norm has no bias (the official
  MultiHeadDenseBlock's mix_conv)."""
  net = nn.DenseFlowConditioner(6, width=16, dense_layers=2, dense_growth=8)
  net(_input())
  convs = [l for l in net._flatten_layers() if isinstance(l, keras.layers.Conv2D)]
  assert len(convs) == 1 + 2 * 2 + 1 + 2 + 1 + 1
  assert all(isinstance(c, torch_init.Conv2D) for c in convs if c is not net.conv_out)
  assert not np.any(net.conv_out.kernel.numpy())
  assert not net.conv_mid.use_bias and net.conv_mid.bias is None


def test_nystrom_rejects_indivisible_tokens():
  with pytest.raises(ValueError, match='not divisible by num_landmarks'):
    nn.NystromAttention(8, num_landmarks=4)(tf.zeros([1, 3, 3, 2]))
  nn.NystromAttention(8, num_landmarks=4, exact=True)(tf.zeros([1, 3, 3, 2]))  # exact: fine


# --- weight norm -------------------------------------------------------------------------


def test_weight_norm_kernel_norm_equals_g():
  layer = nn.WeightNormConv2D(5, 3)
  layer.build((None, 4, 4, 3))
  g = np.array([0.5, 1., 2., 3., 0.1], np.float32)
  layer.g.assign(g)
  norms = np.sqrt(np.sum(np.square(layer.kernel.numpy()), axis=(0, 1, 2)))
  np.testing.assert_allclose(norms, g, rtol=1e-5)
  # The convolution uses that kernel.
  x = _input()
  ref = tf.nn.conv2d(x, layer.kernel, 1, 'SAME') + layer.b
  np.testing.assert_allclose(layer(x).numpy(), ref.numpy(), atol=1e-6)


def test_weight_norm_scales_collects_every_g():
  net = nn.ResNetConditioner(8, 2, 6)
  net(_input())
  scales = nn.weight_norm_scales(net)
  assert len(scales) == 1 + 2 * 2 + 1  # conv in, 2 per block, conv out
  assert all(s.path.endswith('/g') for s in scales)
  trainable = {id(w) for w in net.trainable_weights}
  assert all(id(s) in trainable for s in scales)

  class Holder(tf.Module):  # e.g. a bijector holding its conditioner
    def __init__(self, layers):
      super().__init__()
      self.layers = layers

  other = nn.ResNetConditioner(8, 1, 6)
  other(_input())
  assert len(nn.weight_norm_scales(Holder([net, other, net]))) == 6 + 4


# --- DenseFlow parameter count -----------------------------------------------------------


def test_denseflow_conditioner_parameter_count():
  """Paper defaults (width 48, 7 dense layers of growth 64, attention embed 24), in 6 channels
  (ceil(12/2) at 16x16x12) and out 12 (shift and scale for 6). Counted by hand:
    conv_in 6*48+48 = 336; dense block sum_i (c_i^2 + c_i + 9*64*c_i + 64) for
    c_i = 48, 112, ..., 432 = 1,487,696; gated conv 496*144+144 = 71,568; attention
    3*(48*24+24) + 24*48+48 = 4,728; batch norm 4*96 = 384 (192 trainable); conv_mid 96*48
    = 4,608 (no bias, as in the official code); conv_out 48*12+12 = 588. Total 1,569,908, which
    matches the paper's "about 1.58M" within 1%; the dense block is 95% of it."""
  net = nn.DenseFlowConditioner(12)
  net(tf.zeros([1, 16, 16, 6]))
  assert net.count_params() == 1_569_908
  assert 1.55e6 < net.count_params() < 1.60e6
  assert net.dense.count_params() == 1_487_696


def test_glow_conditioner_hidden_layers_as_the_reference_code():
  """conv (no bias, kernel ~ N(0, 0.05^2)) -> ActNorm -> ReLU, twice: after the data-dependent
  initialisation on a batch the hidden pre-activations of that batch have zero mean and unit
  variance per channel."""
  from bijectors import actnorm
  keras.utils.set_random_seed(0)
  net = nn.GlowConditioner(64, 6)
  x = tf.random.normal([8, 8, 8, 16])
  net(x)
  assert not net.conv_in.use_bias and not net.conv_mid.use_bias
  np.testing.assert_allclose(np.std(net.conv_in.kernel.numpy()), 0.05, rtol=0.05)
  with actnorm.data_initialization():
    net(x)
  h = net.norm_in(net.conv_in(x))
  h2 = net.norm_mid(net.conv_mid(tf.nn.relu(h)))
  for a in (h, h2):
    np.testing.assert_allclose(np.mean(a.numpy(), axis=(0, 1, 2)), 0., atol=1e-4)
    np.testing.assert_allclose(np.std(a.numpy(), axis=(0, 1, 2)), 1., rtol=1e-3)
