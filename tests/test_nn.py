"""Tests of the conditioner layers in tfflows.nn (small sizes; the whole file runs in ~1 min)."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfflows import nn

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


@pytest.mark.parametrize('name', ['zero_conv', 'glow', 'resnet', 'nystrom', 'denseflow', 'flowpp'])
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
    3*(48*24+24) + 24*48+48 = 4,728; batch norm 4*96 = 384 (192 trainable); conv_mid 96*48+48
    = 4,656; conv_out 48*12+12 = 588. Total 1,569,956, which matches the paper's "about 1.58M"
    within 1%; the dense block is 95% of it."""
  net = nn.DenseFlowConditioner(12)
  net(tf.zeros([1, 16, 16, 6]))
  assert net.count_params() == 1_569_956
  assert 1.55e6 < net.count_params() < 1.60e6
  assert net.dense.count_params() == 1_487_696
