import keras
import numpy as np
import pytest
import tensorflow as tf

from bijectors.mixlogcdf import MixLogCDFCoupling, mixture_log_cdf_sf_pdf
from tests import flow_checks


def _coupling(channels, num_components, method='chandrupatla', zero=False):
  """A coupling with a stand-in Conv2D conditioner whose outputs are of order one."""
  out = MixLogCDFCoupling.conditioner_channels(channels, num_components)
  if zero:
    kernel, bias = 'zeros', 'zeros'
  else:
    kernel = keras.initializers.RandomNormal(stddev=0.1)
    bias = keras.initializers.RandomNormal(stddev=0.5)
  conditioner = keras.layers.Conv2D(out, 3, padding='same', kernel_initializer=kernel,
                                    bias_initializer=bias)
  return MixLogCDFCoupling(conditioner, channels, num_components, inverse_method=method)


def test_conditioner_channels():
  assert MixLogCDFCoupling.conditioner_channels(6, 32) == 3 * 98
  assert MixLogCDFCoupling.conditioner_channels(3, 4) == 1 * 14


def test_zero_conditioner_is_identity():
  b = _coupling(4, 8, zero=True)
  x = tf.random.normal([2, 4, 4, 4]) * 3.
  y, ldj = b.forward_and_log_det(x)
  np.testing.assert_allclose(y, x, atol=1e-5)
  np.testing.assert_allclose(ldj, 0., atol=1e-4)


def test_mixture_cdf_matches_direct_formula(float64):
  x = tf.random.normal([5, 3], dtype=tf.float64) * 2.
  log_pi = tf.nn.log_softmax(tf.random.normal([5, 3, 4], dtype=tf.float64))
  mu = tf.random.normal([5, 3, 4], dtype=tf.float64)
  log_s = tf.random.normal([5, 3, 4], dtype=tf.float64) * 0.5
  log_cdf, log_sf, log_pdf = mixture_log_cdf_sf_pdf(x, log_pi, mu, log_s)
  sig = tf.sigmoid((x[..., None] - mu) * tf.exp(-log_s))
  pi = tf.exp(log_pi)
  np.testing.assert_allclose(tf.exp(log_cdf), tf.reduce_sum(pi * sig, -1), rtol=1e-12)
  np.testing.assert_allclose(tf.exp(log_sf), tf.reduce_sum(pi * (1. - sig), -1), rtol=1e-10)
  pdf = tf.reduce_sum(pi * sig * (1. - sig) * tf.exp(-log_s), -1)
  np.testing.assert_allclose(tf.exp(log_pdf), pdf, rtol=1e-12)


@pytest.mark.parametrize('method', ['chandrupatla', 'bisection'])
def test_invertible_float32(method):
  b = _coupling(6, 32, method)
  x = tf.clip_by_value(tf.random.normal([4, 8, 8, 6]) * 3., -10., 10.)
  y, fldj = b.forward_and_log_det(x)
  x_back, ildj = b.inverse_and_log_det(y)
  # Element-wise: x is found by a float32 root search on u = logit F(x), so it is recovered
  # to the rounding of u over the slope d u / d x; up to 1.1e-5 at |x| <= 10 over 5 seeds.
  np.testing.assert_allclose(x_back, x, atol=2e-5)
  # Each example's log-det sums 8 * 8 * 3 = 192 per-dimension terms of order one (|sum| ~
  # 100-160). float32 keeps ~7 significant digits (eps 1.2e-7), so a fixed 1e-5 is about one
  # ulp of the sum and fails where the kernels round differently (3.05e-5 on an AVX2 CPU with
  # TensorFlow's plain kernels). The tolerance scales with the sum: forward and inverse agree
  # to a relative 1e-7 to 7e-7 (5 seeds, oneDNN on and off), hence rtol 2e-6.
  assert fldj.shape == ildj.shape == (4,)
  np.testing.assert_allclose(ildj, -fldj, rtol=2e-6, atol=0)


@pytest.mark.parametrize('method', ['chandrupatla', 'bisection'])
def test_invertible_float64(float64, method):
  b = _coupling(5, 16, method)
  x = tf.clip_by_value(tf.random.normal([4, 6, 6, 5], dtype=tf.float64) * 3., -10., 10.)
  flow_checks.assert_invertible(b, x, atol=1e-9)


def test_log_det_matches_jacobian(float64):
  b = _coupling(3, 4)
  x = tf.random.normal([2, 2, 2, 3], dtype=tf.float64) * 2.
  _, _, mix = b._params(x[..., :2])
  assert np.std(mix[1].numpy()) > 0.1 and np.std(mix[0].numpy()) > 0.05  # non-trivial mixtures
  flow_checks.assert_log_det_matches_jacobian(b, x, atol=1e-8)


def test_log_scale_clamp_and_tails(float64):
  """Very narrow components (log s below -7 gets clamped) and far tails stay invertible."""
  b = _coupling(2, 4)
  b.conditioner.build((None, 3, 3, 1))
  bias = np.zeros([14])
  bias[10:] = -20.  # log s_k -> clamped at -7
  b.conditioner.bias.assign(bias)
  x = tf.constant(np.linspace(-15., 15., 18).reshape([2, 3, 3, 1]).repeat(2, -1))
  y, ldj = b.forward_and_log_det(x)
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(ldj))
  flow_checks.assert_invertible(b, x, atol=1e-9)


@pytest.mark.parametrize('jit_compile', [False, True])
def test_unknown_batch(jit_compile):
  b = _coupling(4, 8)
  x = tf.random.normal([3, 4, 4, 4]) * 2.
  flow_checks.assert_unknown_batch(b, x, jit_compile)


def test_unknown_batch_bisection_xla():
  b = _coupling(4, 8, 'bisection')
  x = tf.random.normal([3, 4, 4, 4]) * 2.
  flow_checks.assert_unknown_batch(b, x, jit_compile=True)


def test_gradients_finite():
  b = _coupling(4, 8)
  x = tf.random.normal([2, 4, 4, 4]) * 2.
  with tf.GradientTape() as tape:
    y, ldj = b.forward_and_log_det(x)
    loss = tf.reduce_sum(y ** 2) - tf.reduce_sum(ldj)
  grads = tape.gradient(loss, b.conditioner.trainable_weights)
  assert all(np.all(np.isfinite(g)) for g in grads)
