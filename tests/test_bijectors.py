"""Tests of what is particular to the basic bijectors: squeeze's channel order, the 1x1
convolution's conventions, coupling masks and parities, permutations, preprocessing. What every
bijector class must do (invertibility, log-det against the autodiff Jacobian, shapes, graphs with
unknown batch, TFP's contract) is swept over all of them by tests/test_contract.py.

Tolerances: round trips in float64 to 1e-10 (1e-5 in float32); log-dets against the autodiff
Jacobian in float64 to 1e-6 (flow_checks); tf.function / XLA results against eager to 1e-5.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import bijectors
from bijectors import AffineCoupling
from tests import flow_checks

ATOL64 = 1e-10


def conditioner(out_channels):
  """A small 3x3 conv conditioner with non-zero (Glorot and random bias) weights."""
  return keras.layers.Conv2D(out_channels, 3, padding='same',
                             bias_initializer=keras.initializers.RandomNormal(stddev=0.5))


def coupling(channels, mask, parity=0, scale_fn='sigmoid'):
  net = conditioner(AffineCoupling.conditioner_channels(channels, mask))
  return AffineCoupling(net, channels, mask=mask, parity=parity, scale_fn=scale_fn)


def flat_permutation(event_shape, out_shape=None):
  size = int(np.prod(event_shape))
  return bijectors.FlatPermutation(np.random.default_rng(1).permutation(size), event_shape,
                                   out_shape)


def make_input(shape, kind, dtype):
  if kind == 'pixels':
    return tf.random.uniform(shape, 0., 256., dtype=dtype)
  if kind == 'unit':
    return tf.random.uniform(shape, -0.5, 0.5, dtype=dtype)
  return tf.random.normal(shape, dtype=dtype)


# -- squeeze ----------------------------------------------------------------------------------
def test_squeeze_channel_order():
  h, w, c = 4, 6, 3
  x = np.arange(2 * h * w * c, dtype=np.float32).reshape([2, h, w, c])
  y = bijectors.squeeze(tf.constant(x)).numpy()
  assert y.shape == (2, h // 2, w // 2, 4 * c)
  for i in range(h // 2):
    for j in range(w // 2):
      for ch in range(c):
        for dy in range(2):
          for dx in range(2):
            assert y[1, i, j, ch * 4 + 2 * dy + dx] == x[1, 2 * i + dy, 2 * j + dx, ch]
  np.testing.assert_array_equal(bijectors.unsqueeze(tf.constant(y)).numpy(), x)


def test_squeeze_any_batch_rank():
  x = tf.random.normal([2, 3, 4, 4, 1])
  y = bijectors.squeeze(x)
  assert y.shape == [2, 3, 2, 2, 4]
  np.testing.assert_array_equal(y[1, 2], bijectors.squeeze(x[1])[2])
  np.testing.assert_array_equal(bijectors.unsqueeze(y), x)
  np.testing.assert_array_equal(bijectors.squeeze(x[1, 2]), y[1, 2])    # unbatched event
  flat = flat_permutation([4, 4, 1], [2, 2, 4])
  np.testing.assert_array_equal(flat.forward(x)[0, 1], flat.forward(x[0, 1]))
  np.testing.assert_array_equal(flat.inverse(flat.forward(x)), x)


@pytest.mark.parametrize('shape', [[1, 3, 4, 2], [1, 4, 5, 2]])
def test_squeeze_odd_size_raises(shape):
  with pytest.raises(ValueError, match='even height and width'):
    bijectors.Squeeze().forward(tf.zeros(shape))


def test_unsqueeze_bad_channels_raises():
  with pytest.raises(ValueError, match='divisible by 4'):
    bijectors.unsqueeze(tf.zeros([1, 2, 2, 6]))


# -- 1x1 conv ---------------------------------------------------------------------------------
@pytest.mark.parametrize('parameterization', ['lu', 'plain'])
def test_conv1x1_convention_and_init(parameterization):
  b = bijectors.InvertibleConv1x1(3, parameterization)
  w, log_abs_det = b._matrix_and_log_abs_det(tf.float32)
  np.testing.assert_allclose(w.numpy() @ w.numpy().T, np.eye(3), atol=1e-5)  # orthogonal
  np.testing.assert_allclose(log_abs_det.numpy(), 0., atol=1e-5)
  x = tf.random.normal([2, 2, 2, 3])
  y = b.forward(x)
  np.testing.assert_allclose(y[1, 0, 1].numpy(), w.numpy() @ x[1, 0, 1].numpy(), atol=1e-5)
  assert len(b.layers[0].trainable_weights) == (3 if parameterization == 'lu' else 1)


def test_conv1x1_lu_fixed_parts_are_saved_weights():
  p = bijectors.InvertibleConv1x1(4, 'lu').params
  assert {w.name for w in p.non_trainable_weights} == {'perm', 'sign'}
  perm = p.perm.numpy()
  np.testing.assert_array_equal(np.sort(perm, axis=0)[-1], np.ones(4))  # a permutation matrix


def test_conv1x1_bad_parameterization():
  with pytest.raises(ValueError, match='parameterization'):
    bijectors.InvertibleConv1x1(3, 'qr')


# -- coupling -------------------------------------------------------------------------------
@pytest.mark.parametrize('parity, kept', [(0, [0, 1, 2]), (1, [2, 3, 4])])
def test_channel_coupling_parity(parity, kept):
  b = coupling(5, 'channel', parity)
  x = tf.random.normal([2, 4, 4, 5])
  y = b.forward(x)
  np.testing.assert_array_equal(tf.gather(y, kept, axis=-1), tf.gather(x, kept, axis=-1))
  changed = [c for c in range(5) if c not in kept]
  assert np.all(np.abs(tf.gather(y - x, changed, axis=-1).numpy()) > 0)


@pytest.mark.parametrize('parity', [0, 1])
def test_checkerboard_parity(parity):
  b = coupling(2, 'checkerboard', parity)
  x = tf.random.normal([1, 4, 4, 2])
  same = np.all(b.forward(x).numpy() == x.numpy(), axis=-1)[0]
  hh, ww = np.meshgrid(np.arange(4), np.arange(4), indexing='ij')
  np.testing.assert_array_equal(same, (hh + ww + parity) % 2 == 1)


@pytest.mark.parametrize('mask', ['channel', 'checkerboard'])
def test_conditional_coupling(mask, float64):
  c = 2
  net = conditioner(AffineCoupling.conditioner_channels(c, mask))
  b = AffineCoupling(net, c, mask=mask, scale_fn='exp_tanh')
  x = tf.random.normal([1, 2, 4, c], dtype=tf.float64)
  ctx = tf.random.normal([1, 2, 4, 3], dtype=tf.float64)
  flow_checks.assert_invertible(b, x, atol=ATOL64, context=ctx)
  flow_checks.assert_log_det_matches_jacobian(b, x, context=ctx)
  assert net.kernel.shape[2] == (1 if mask == 'channel' else c) + 3  # the context was seen
  y_other, _ = b.forward_and_log_det(x, context=ctx + 1.)
  assert not np.allclose(y_other.numpy(), b.forward(x, context=ctx).numpy())


@pytest.mark.parametrize('jit_compile', [False, True])
def test_conditional_coupling_unknown_batch(jit_compile):
  b = coupling(2, 'checkerboard', 1, 'tanh')
  spec = tf.TensorSpec([None, 4, 4, 2])
  fwd = tf.function(lambda t, c: b.forward_and_log_det(t, context=c), jit_compile=jit_compile,
                    input_signature=[spec, spec])
  inv = tf.function(lambda t, c: b.inverse_and_log_det(t, context=c), jit_compile=jit_compile,
                    input_signature=[spec, spec])
  x, ctx = tf.random.normal([3, 4, 4, 2]), tf.random.normal([3, 4, 4, 2])
  y, ldj = fwd(x, ctx)
  y_eager, ldj_eager = b.forward_and_log_det(x, context=ctx)
  np.testing.assert_allclose(y.numpy(), y_eager.numpy(), atol=1e-5)
  np.testing.assert_allclose(ldj.numpy(), ldj_eager.numpy(), atol=1e-4)
  np.testing.assert_allclose(inv(y, ctx)[0].numpy(), x.numpy(), atol=1e-4)


def test_coupling_layers_and_tanh_scale_init():
  b = coupling(4, 'channel', scale_fn='tanh')
  assert b.layers == [b.conditioner, b.tanh_scale]
  np.testing.assert_array_equal(b.tanh_scale.scale.numpy(), np.ones(2))
  plain = coupling(4, 'channel')
  assert plain.layers == [plain.conditioner] and plain.tanh_scale is None


def test_coupling_conditioner_channels():
  assert AffineCoupling.conditioner_channels(5, 'channel') == 4
  assert AffineCoupling.conditioner_channels(5, 'checkerboard') == 10
  b = AffineCoupling(conditioner(3), 4, mask='channel')
  with pytest.raises(ValueError, match='must output 4 channels'):
    b.forward(tf.zeros([1, 2, 2, 4]))
  with pytest.raises(ValueError, match='mask'):
    AffineCoupling(conditioner(2), 4, mask='stripes')


# -- permutations -----------------------------------------------------------------------------
def test_swap_halves_odd():
  x = tf.reshape(tf.range(5.), [1, 1, 1, 5])
  y = bijectors.SwapHalves().forward(x)
  np.testing.assert_array_equal(y.numpy().ravel(), [3., 4., 0., 1., 2.])


def test_channel_and_flat_permutation_order():
  x = tf.reshape(tf.range(8.), [1, 2, 2, 2])
  y = bijectors.ChannelPermutation([1, 0]).forward(x)
  np.testing.assert_array_equal(y.numpy()[..., 0], x.numpy()[..., 1])
  perm = np.arange(8)[::-1]
  y = bijectors.FlatPermutation(perm, [2, 2, 2], [1, 1, 8]).forward(x)
  np.testing.assert_array_equal(y.numpy().ravel(), np.arange(8.)[::-1])


@pytest.mark.parametrize('perm, message', [
    ([0, 1, 1], 'duplicated indices \\[1\\]'),
    ([0, 1, 3], 'out-of-range indices \\[3\\]'),
    ([[0, 1]], '1-D'),
])
def test_non_permutation_raises(perm, message):
  with pytest.raises(ValueError, match=message):
    bijectors.ChannelPermutation(perm)


def test_flat_permutation_bad_sizes():
  with pytest.raises(ValueError, match='has 7 entries but must have 8'):
    bijectors.FlatPermutation(list(range(7)), [2, 2, 2])
  with pytest.raises(ValueError, match='different size'):
    bijectors.FlatPermutation(list(range(8)), [2, 2, 2], [2, 2, 3])


# -- composition ------------------------------------------------------------------------------
@pytest.mark.parametrize('jit_compile', [False, True])
def test_chain_of_everything(jit_compile):
  flow = bijectors.Chain([
      bijectors.ToUnitInterval(), bijectors.Logit(), bijectors.Squeeze(),
      bijectors.InvertibleConv1x1(8), coupling(8, 'channel', 0, 'sigmoid'), bijectors.SwapHalves(),
      bijectors.ReverseChannels(), flat_permutation([2, 2, 8], [4, 4, 2])])
  v = make_input([2, 4, 4, 2], 'pixels', tf.float32)
  flow_checks.assert_invertible(flow, v, atol=1e-3)
  flow_checks.assert_unknown_batch(flow, v, jit_compile)
  assert flow.forward_event_shape([4, 4, 2]) == [4, 4, 2]
  assert len(flow.layers) == 2


# -- preprocessing ----------------------------------------------------------------------------
def test_preprocess_values():
  v = tf.constant([0., 128., 256.], shape=[1, 1, 1, 3])
  x, ldj = bijectors.ToUnitInterval().forward_and_log_det(v)
  np.testing.assert_allclose(x.numpy().ravel(), [-0.5, 0., 0.5])
  np.testing.assert_allclose(ldj.numpy(), -3 * math.log(256.), rtol=1e-6)
  y = bijectors.Logit(0.05).forward(x)
  np.testing.assert_allclose(y.numpy().ravel(), [math.log(0.05 / 0.95), 0., math.log(19.)],
                             rtol=1e-5, atol=1e-6)
