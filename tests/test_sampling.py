"""Image grids, latent interpolation and the nearest-training-image memorisation check."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import tfflows
from tfflows import sampling


def _random_images(n, shape, seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


# -- grids ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('channels, mode', [(1, 'L'), (3, 'RGB')])
def test_grid_png_dimensions_and_content(tmp_path, channels, mode):
  images = _random_images(5, (8, 6, channels))
  path = tmp_path / 'grid.png'
  grid = sampling.save_image_grid(images, path, nrow=3, padding=2)
  with Image.open(path) as picture:
    assert picture.mode == mode
    assert picture.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)  # (width, height)
    pixels = np.asarray(picture).reshape(grid.shape)
  np.testing.assert_array_equal(pixels, grid)
  np.testing.assert_array_equal(pixels[2:10, 2:8], images[0])  # first image after the border
  np.testing.assert_array_equal(pixels[12:20, 10:16], images[4])  # row 1, column 1
  assert not pixels[:2].any() and not pixels[:, :2].any()  # the border
  assert os.listdir(tmp_path) == ['grid.png']  # no temporary file left behind


def test_grid_of_rows_and_default_layout():
  rows = _random_images(6, (4, 4, 1)).reshape(2, 3, 4, 4, 1)
  assert sampling.image_grid(rows, padding=1).shape == (2 * 5 + 1, 3 * 5 + 1, 1)
  assert sampling.image_grid(_random_images(10, (4, 4, 3)), padding=1).shape == (3 * 5 + 1,
                                                                                4 * 5 + 1, 3)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((2, 4, 4, 1), np.float32), 'uint8'),
    (np.zeros((2, 4, 4, 2), np.uint8), '1 or 3 channels'),
    (np.zeros((4, 4, 1), np.uint8), r'\[N, H, W, C\]'),
])
def test_grid_refuses_bad_images(tmp_path, bad, message):
  with pytest.raises(ValueError, match=message):
    sampling.save_image_grid(bad, tmp_path / 'bad.png')
  assert not os.listdir(tmp_path)


# -- interpolation -------------------------------------------------------------------------------
def test_interpolation_end_points_are_exact():
  import keras  # pylint: disable=import-outside-toplevel
  model = tfflows.build_model(tfflows.FlowConfig(model='glow', image_shape=(8, 8, 1),
                                                 num_levels=2, steps_per_level=2, width=8))
  model.compile(keras.optimizers.SGD(1e-2))
  model.fit(_random_images(8, (8, 8, 1), seed=1), epochs=1, batch_size=8, verbose=0)
  a, b = _random_images(3, (8, 8, 1), seed=2), _random_images(3, (8, 8, 1), seed=3)
  path = sampling.linear_interpolation(model, a, b, steps=5)
  assert path.shape == (3, 5, 8, 8, 1) and path.dtype == np.uint8
  np.testing.assert_array_equal(path[:, 0], a)
  np.testing.assert_array_equal(path[:, -1], b)
  assert not np.array_equal(path[:, 2], a) and not np.array_equal(path[:, 2], b)
  single = sampling.linear_interpolation(model, a[0], b[0], steps=2)
  np.testing.assert_array_equal(single, np.stack([a[:1], b[:1]], axis=1))
  with pytest.raises(ValueError, match='steps must be >= 2'):
    sampling.linear_interpolation(model, a, b, steps=1)


# -- memorisation check --------------------------------------------------------------------------
def _brute_force(samples, train, crop):
  def flat(x):
    h, w = x.shape[1:3]
    ch, cw = min(crop, h), min(crop, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top:top + ch, left:left + cw].reshape(len(x), -1).astype(np.float64)
  q, t = flat(samples), flat(train)
  return np.sqrt(((q[:, None] - t[None]) ** 2).sum(-1))


def test_nearest_neighbours_find_planted_duplicates():
  train = _random_images(300, (16, 16, 3), seed=4)
  samples = _random_images(12, (16, 16, 3), seed=5)
  planted = [0, 299, 150, 77, 123]
  samples[:5] = train[planted]
  samples[5] = train[200]
  samples[5, :3] = 255 - samples[5, :3]  # changed outside the central 10 x 10 crop only
  noisy = train[42].astype(int) + np.random.RandomState(6).randint(-2, 3, train[42].shape)
  samples[6] = np.clip(noisy, 0, 255)
  indices, distances = sampling.nearest_training_images(samples, train, crop=10, k=4, batch=37)
  assert indices.shape == (12, 4) and indices.dtype == np.int64
  assert distances.shape == (12, 4) and distances.dtype == np.float32
  np.testing.assert_array_equal(indices[:7, 0], planted + [200, 42])
  np.testing.assert_array_equal(distances[:6, 0], 0.)
  assert 0 < distances[6, 0] < 0.05 * distances[7, 0]
  assert np.all(np.diff(distances, axis=1) >= 0)
  exact = _brute_force(samples, train, crop=10)
  np.testing.assert_array_equal(indices, np.argsort(exact, axis=1, kind='stable')[:, :4])
  np.testing.assert_allclose(distances, np.sort(exact, axis=1)[:, :4], rtol=1e-6)
  # An iterable of batches (a tf.data pipeline) gives the same neighbours.
  dataset = tf.data.Dataset.from_tensor_slices(train).batch(64)
  streamed, streamed_d = sampling.nearest_training_images(samples, dataset, crop=10, k=4)
  np.testing.assert_array_equal(streamed, indices)
  np.testing.assert_allclose(streamed_d, distances, rtol=1e-4, atol=0.5)


def test_images_smaller_than_the_crop_are_compared_whole():
  train = _random_images(50, (8, 8, 1), seed=7)
  samples = train[[3, 9]].copy()
  samples[:, 0, 0] = 0  # a corner pixel: only a whole-image comparison sees it
  whole = sampling.nearest_training_images(samples, train, crop=None, k=3)
  for got, want in zip(sampling.nearest_training_images(samples, train, crop=42, k=3), whole):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(whole[0][:, 0], [3, 9])


def test_memorization_grid_rows(tmp_path):
  train = _random_images(40, (8, 8, 3), seed=8)
  samples = train[[5, 6]]
  indices, _ = sampling.nearest_training_images(samples, train, k=5)
  rows = sampling.memorization_grid(samples, train, indices)
  assert rows.shape == (2, 6, 8, 8, 3) and rows.dtype == np.uint8
  np.testing.assert_array_equal(rows[:, 0], samples)
  np.testing.assert_array_equal(rows[:, 1:], train[indices])
  grid = sampling.save_image_grid(rows, tmp_path / 'nearest.png', padding=1)
  assert grid.shape == (2 * 9 + 1, 6 * 9 + 1, 3)
  with pytest.raises(ValueError, match=r'indices must be \[N, k\]'):
    sampling.memorization_grid(samples, train, indices[:1])
