"""Seeded numbers are a function of the image and the seed alone (tfflows.random: Philox per
image), and a model never turns NaN into pixels or numbers silently."""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from tests import flow_checks
import tfflows
from tfflows import random
from tfflows.models.flow_model import NonFiniteError

GLOW = dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=2, width=8)
DENSEFLOW = dict(model='denseflow', image_shape=(8, 8, 1), block_conf=(2, 2), layers_conf=(1, 1),
                 layer_mid_channels=(8, 8), growth_rate=2, dense_layers=1, dense_growth=4,
                 split_prior='standard', dequantization='variational')
# An image's noise is the same bits in any batch (compared exactly below). Its number can still
# differ by a float32 ulp: oneDNN chooses kernels by batch size, and a batch of one Glow image
# ended 8.3e-8 relative away from the same image in a batch of 8 (measured on an AVX512 CPU;
# batches of 8, 512 and reversed were bit-identical, and every comparison was with
# TF_ENABLE_ONEDNN_OPTS=0). Before per-image noise the differences were ~1e-4 relative.
RTOL = 1e-6


def _images(n, seed=0, shape=(8, 8, 1)):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


def _initialised(config):
  model = tfflows.build_model(tfflows.FlowConfig(**config))
  model.initialize(_images(16, seed=99))  # ActNorm's initialisation
  return model


# ------------------------------------------------------------------------------ Philox
def test_philox_matches_tensorflows_kernel_bit_for_bit():
  rng = np.random.RandomState(0)
  keys = rng.randint(0, 2 ** 32, size=(16, 2), dtype=np.uint64)
  counters = rng.randint(0, 2 ** 32, size=(16, 4), dtype=np.uint64)
  counters[0], keys[0] = 0, 0   # Random123's known answer: 6627e8d5 e169c58d bc57ac4c 9b00dbd8
  ours = np.stack([w.numpy() for w in random.philox4x32(
      [tf.constant(c, tf.uint32) for c in counters.T.astype(np.uint32)],
      [tf.constant(k, tf.uint32) for k in keys.T.astype(np.uint32)])], axis=1)
  np.testing.assert_array_equal(ours[0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8])
  shift = np.uint64(32)
  for key, counter, got in zip(keys, counters, ours):
    expected = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[4], key=tf.constant([key[0] | (key[1] << shift)], tf.uint64),
        counter=tf.constant([counter[0] | (counter[1] << shift),
                             counter[2] | (counter[3] << shift)], tf.uint64),
        alg=1, dtype=tf.uint32)   # alg 1: TensorFlow's Philox-4x32-10
    np.testing.assert_array_equal(got, expected.numpy())


def test_per_image_draws_depend_only_on_the_image_and_the_seed():
  images = _images(8)
  seeds = random.example_seeds(images, 3)
  shape = (8, 5, 3, 2)
  for draw in (random.uniform, random.normal):
    batch = draw(shape, seeds).numpy()
    for i in range(8):   # alone: the same bits
      np.testing.assert_array_equal(
          draw((1,) + shape[1:], random.example_seeds(images[i:i + 1], 3)).numpy()[0], batch[i])
    np.testing.assert_array_equal(   # reversed
        draw(shape, random.example_seeds(images[::-1], 3)).numpy()[::-1], batch)
  # Under XLA: the same bits and uniforms; normals within an ulp (XLA's log, sqrt, cos and sin
  # are not Eigen's).
  jitted = tf.function(lambda s: (random.uniform(shape, s), random.normal(shape, s)),
                       jit_compile=True)(seeds)
  np.testing.assert_array_equal(jitted[0].numpy(), random.uniform(shape, seeds).numpy())
  np.testing.assert_allclose(jitted[1].numpy(), random.normal(shape, seeds).numpy(), rtol=1e-6,
                             atol=1e-6)
  # Another seed, another image, or one pixel changed: other noise.
  assert not np.array_equal(random.example_seeds(images, 4), seeds)
  changed = images.copy()
  changed[0, 3, 3, 0] ^= 1
  changed_seeds = random.example_seeds(changed, 3).numpy()
  assert not np.array_equal(changed_seeds[0], seeds[0]) and \
      np.array_equal(changed_seeds[1:], seeds[1:])
  # Floats holding pixel values give the seeds of their uint8 images.
  np.testing.assert_array_equal(random.example_seeds(tf.cast(images, tf.float32), 3), seeds)


@pytest.mark.parametrize('dtype', [tf.float32, tf.float64])
def test_per_image_draws_are_uniform_and_normal(dtype):
  seeds = random.example_seeds(_images(16, seed=1), 0)
  u = random.uniform((16, 4000), seeds, dtype).numpy()
  z = random.normal((16, 4001), seeds, dtype).numpy()   # odd: one Box-Muller value unused
  assert u.dtype == z.dtype == dtype.as_numpy_dtype
  assert 0. <= u.min() and u.max() < 1.
  assert scipy.stats.kstest(u.ravel(), 'uniform').pvalue > 1e-3
  assert scipy.stats.kstest(z.ravel(), 'norm').pvalue > 1e-3
  assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.06 and abs(np.corrcoef(z[0], z[1])[0, 1]) < 0.06


# ---------------------------------------------------------------- the model's numbers
@pytest.mark.parametrize('config', [GLOW, DENSEFLOW], ids=['glow', 'denseflow'])
def test_an_images_seeded_log_prob_does_not_depend_on_its_batch(config):
  """Alone, in a batch of 8, reversed, in a batch of 512: the same number (dequantization
  and, for DenseFlow, variational dequantization and augmentation noise drawn per image); for
  the bound and the IW estimate."""
  model = _initialised(config)
  images = _images(512, seed=5)
  # The IW estimate (k = 2, per-sample seeds folded from each image's) on Glow only: every
  # tf.function trace of a DenseFlow costs seconds.
  for k, batch in ((1, 512), (2, 16)) if config is GLOW else ((1, 512),):
    eight = model.log_prob(images[:8], k, seed=0).numpy()
    others = [model.log_prob(images[:batch], k, seed=0).numpy()[:8],
              model.log_prob(images[:8][::-1], k, seed=0).numpy()[::-1],
              np.array([model.log_prob(images[i:i + 1], k, seed=0).numpy()[0] for i in range(3)])]
    for other in others:
      np.testing.assert_allclose(other, eight[:len(other)], rtol=RTOL, atol=0)
  # The seed still matters, and the IW estimate of k samples is not the bound.
  assert not np.allclose(model.log_prob(images[:8], seed=1).numpy(), eight, rtol=1e-5)


# --------------------------------------------------- non-finite values are never silent
def _poison(model):
  """Finite weights whose model gives NaN: the first coupling network's weights at 1e30."""
  for w in flow_checks.first_level_networks(model):
    w.assign(tf.fill(w.shape, tf.constant(1e30, w.dtype)))


def test_sample_refuses_temperatures_that_are_not_finite():
  model = _initialised(GLOW)
  for t in (float('inf'), float('nan'), -1.):
    with pytest.raises(ValueError, match='temperature must be a finite number >= 0'):
      model.sample(2, temperature=t, seed=0)
  assert model.sample(2, temperature=0., seed=0).shape == (2, 8, 8, 1)


def test_a_model_that_gives_nan_raises_instead_of_returning_pixels():
  model = _initialised(GLOW)
  _poison(model)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in model.variables)
  with pytest.raises(NonFiniteError, match=r'model\.sample\(n=3, temperature=1\.0\): 3 of 3 '
                                           r'images hold NaN or Inf'):
    model.sample(3, seed=0)
  with pytest.raises(NonFiniteError, match='model.decode'):
    model.decode(model.encode(_images(2)))
