"""Input pipelines: uint8 image batches for training and evaluating flows.

`make_dataset` turns any registered source into a tf.data.Dataset of uint8 [B, H, W, C]
batches (labels dropped): shuffle buffer -> repeat -> augmentation -> batch -> prefetch.
Images stay uint8 so dequantization (and the 1/256 scaling) happens in the model, once.

Augmentation (uint8, per image): random horizontal flip; random translation by up to
`translate_pixels` in each direction, equal to padding by that many pixels (reflect / edge /
constant) and random-cropping back, as DenseFlow's translation augmentation does.

Determinism: with `deterministic=True`, the order and every augmentation are a function of
`seed`: augmentation uses stateless random ops keyed by (seed, element index in the stream),
shuffles use fixed op seeds, and tf.data keeps the element order under parallelism. (tf.data
shuffles also fold in TF's global seed when one is set, e.g. by keras.utils.set_random_seed,
so reproducing across processes also needs the same global seed, or none.) With
`deterministic=False` a fresh seed is drawn per build and `seed` is ignored.

Sharding (several replicas or workers): `num_shards` / `shard_index` give each replica its
own part of the split, read by that replica's own pipeline: by file where the source has files
that divide evenly among the shards (the ImageNet npz batches, a prepared TFDS split), else by
element (the embedded set; every shard then reads every file and keeps its elements). Shard i
of n draws its shuffle and augmentation from a seed derived from (seed, i, n). Use
`num_examples` to compute steps per epoch (of the global batch).
"""

import dataclasses
import secrets
from typing import Callable

import numpy as np
import tensorflow as tf

from tfflows.data import embedded
from tfflows.data import imagenet_npz
from tfflows.data import sharding
from tfflows.data import tfds_datasets

AUGMENTATIONS = ('flip', 'translate')
TRANSLATE_MODES = ('reflect', 'edge', 'constant')


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """A registered dataset: static facts and a loader.

  load(split, data_dir, download, shuffle_files, seed, shard) -> tf.data.Dataset of
  (image uint8 image_shape, label int64), in a fixed or file-shuffled order; shard: None or
  (num_shards, shard_index), the part of the split this pipeline reads.
  splits: split name -> number of examples (aliases included).
  """
  name: str
  image_shape: tuple
  splits: dict
  load: Callable[..., tf.data.Dataset]
  description: str


def _load_embedded(split, data_dir, download, shuffle_files, seed, shard=None):
  del data_dir, download, shuffle_files, seed  # in memory, shuffled downstream
  images, labels = embedded.load_embedded(split)
  if shard:  # by element: shard i of n keeps images i, i + n, i + 2n, ...
    images, labels = images[shard[1]::shard[0]], labels[shard[1]::shard[0]]
  return tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))


def _tfds_loader(name):
  def load(split, data_dir, download, shuffle_files, seed, shard=None):
    return tfds_datasets.load_tfds(name, split, data_dir, download=download,
                                   shuffle_files=shuffle_files, seed=seed, shard=shard)
  return load


def _imagenet_loader(resolution):
  """Prefers image-net.org npz batches under data_dir, falls back to a prepared TFDS copy."""
  def load(split, data_dir, download, shuffle_files, seed, shard=None):
    try:
      return imagenet_npz.load_imagenet_npz(split, resolution, data_dir,
                                            shuffle_files=shuffle_files, seed=seed, shard=shard)
    except (FileNotFoundError, ValueError) as npz_error:
      try:
        return tfds_datasets.load_tfds(f'imagenet{resolution}', split, data_dir,
                                       download=download, shuffle_files=shuffle_files,
                                       seed=seed, shard=shard)
      except (FileNotFoundError, ImportError):
        raise npz_error from None
  return load


_IMAGENET_SPLITS = {'train': 1_281_167, 'val': 50_000, 'validation': 50_000, 'test': 50_000}
_ENTRIES = [
    DatasetEntry('mnist_embedded', (32, 32, 1), dict(embedded.SPLITS), _load_embedded,
                 '5,000 MNIST digits shipped in the package (offline), padded to 32x32'),
    DatasetEntry('mnist', (32, 32, 1), {'train': 60_000, 'test': 10_000},
                 _tfds_loader('mnist'), 'TFDS mnist, zero-padded to 32x32'),
    DatasetEntry('cifar10', (32, 32, 3), {'train': 50_000, 'test': 10_000},
                 _tfds_loader('cifar10'), 'TFDS cifar10'),
    DatasetEntry('celeba64', (64, 64, 3),
                 {'train': 162_770, 'validation': 19_867, 'val': 19_867, 'test': 19_962},
                 _tfds_loader('celeba64'),
                 'TFDS celeb_a, centre crop 148x148, area resize to 64x64'),
    DatasetEntry('imagenet32', (32, 32, 3), dict(_IMAGENET_SPLITS), _imagenet_loader(32),
                 'downsampled ImageNet 32x32: image-net.org npz batches in data_dir, '
                 'else TFDS imagenet_resized/32x32; test = the 50,000 validation images'),
    DatasetEntry('imagenet64', (64, 64, 3), dict(_IMAGENET_SPLITS), _imagenet_loader(64),
                 'downsampled ImageNet 64x64: image-net.org npz batches in data_dir, '
                 'else TFDS imagenet_resized/64x64; test = the 50,000 validation images'),
]
DATASETS = {e.name: e for e in _ENTRIES}


def get_entry(name):
  """The registry entry of `name`; ValueError listing the known names otherwise."""
  try:
    return DATASETS[name]
  except (KeyError, TypeError):
    raise ValueError(f'unknown dataset {name!r}; known datasets: '
                     f'{", ".join(DATASETS)}') from None


def dataset_info(name):
  """(image_shape, num_train, num_test) of a registered dataset."""
  entry = get_entry(name)
  return entry.image_shape, entry.splits['train'], entry.splits['test']


def num_examples(name, split):
  """Number of examples in one split (e.g. for steps per epoch)."""
  entry = get_entry(name)
  if split not in entry.splits:
    raise ValueError(f'{name} has splits {sorted(entry.splits)}, not {split!r}')
  return entry.splits[split]


# ----------------------------------------------------------------------------- augmentation


def _source_index(index, size, mode):
  """Maps possibly out-of-range pixel indices back into [0, size) for a padding mode."""
  if mode == 'reflect':  # ... 2 1 | 0 1 2 ... n-1 | n-2 ...  (numpy / tf.pad 'reflect')
    index = tf.abs(index)
    index = (size - 1) - tf.abs((size - 1) - index)
  return tf.clip_by_value(index, 0, size - 1)  # 'edge'; also keeps reflect in range


def translate(image, dy, dx, mode='reflect'):
  """Shifts the content of image [H, W, C] by (dy, dx) pixels, filling per `mode`.

  Equals padding by |shift| with `mode` ('reflect', 'edge' or 'constant' zeros) and cropping
  the window that moves the content by (dy, dx). Keeps the dtype (uint8 in, uint8 out).
  """
  if mode not in TRANSLATE_MODES:
    raise ValueError(f'translate mode must be one of {TRANSLATE_MODES}, not {mode!r}')
  shape = tf.shape(image)
  h = image.shape[0] if image.shape[0] is not None else shape[0]
  w = image.shape[1] if image.shape[1] is not None else shape[1]
  rows, cols = tf.range(h) - dy, tf.range(w) - dx
  out = tf.gather(image, _source_index(rows, h, mode), axis=0)
  out = tf.gather(out, _source_index(cols, w, mode), axis=1)
  if mode == 'constant':
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    out = tf.where(inside[:, :, None], out, tf.zeros_like(out))
  return out


def augment_image(image, key, *, flip=True, translate_pixels=0, translate_mode='reflect'):
  """Random flip / translation of one uint8 image, a pure function of key (int64 [2])."""
  flip_key, shift_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  if flip:
    coin = tf.random.stateless_uniform([], flip_key) < 0.5
    image = tf.cond(coin, lambda: tf.reverse(image, axis=[1]), lambda: image)
  if translate_pixels > 0:
    shift = tf.random.stateless_uniform([2], shift_key, minval=-translate_pixels,
                                        maxval=translate_pixels + 1, dtype=tf.int32)
    image = translate(image, shift[0], shift[1], translate_mode)
  return image


def _normalize_augment(augment, translate_pixels):
  if augment is None or augment is False:
    augment = ()
  elif isinstance(augment, str):
    augment = (augment,)
  augment = tuple(augment)
  unknown = [a for a in augment if a not in AUGMENTATIONS]
  if unknown:
    raise ValueError(f'unknown augmentation(s) {unknown}; known: {AUGMENTATIONS}')
  if translate_pixels < 0:
    raise ValueError(f'translate_pixels must be >= 0, got {translate_pixels}')
  if 'translate' in augment and translate_pixels == 0:
    raise ValueError("augment includes 'translate' but translate_pixels is 0")
  return 'flip' in augment


# ---------------------------------------------------------------------------------- builder


def make_dataset(name, split, batch_size, *, data_dir=None, shuffle=True, augment=('flip',),
                 translate_pixels=0, translate_mode='reflect', deterministic=False, seed=0,
                 repeat=True, drop_remainder=True, shuffle_buffer=10_000, download=False,
                 num_shards=1, shard_index=0):
  """tf.data.Dataset of uint8 image batches [B, H, W, C] from a registered dataset.

  name: a key of DATASETS. split: 'train' or 'test' (also the aliases each dataset lists).
  data_dir: TFDS data dir, or the directory holding the ImageNet npz batches.
  shuffle: shuffle files (where the source has several) and examples (buffer of
    `shuffle_buffer`). augment: subset of ('flip', 'translate'); translation by up to
    `translate_pixels` (any value > 0 enables it) with `translate_mode` padding.
  deterministic / seed: see the module docstring. repeat: loop forever (reshuffling each
  epoch). drop_remainder: static batch size. download: let TFDS download missing data.
  num_shards / shard_index: read only part shard_index of num_shards of the split (see the
  module doc); batch_size is then this shard's batch (the global batch / num_shards).
  """
  entry = get_entry(name)
  if split not in entry.splits:
    raise ValueError(f'{name} has splits {sorted(entry.splits)}, not {split!r}')
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
  if translate_mode not in TRANSLATE_MODES:
    raise ValueError(f'translate_mode must be one of {TRANSLATE_MODES}, not {translate_mode!r}')
  flip = _normalize_augment(augment, translate_pixels)
  shard = sharding.check_shard(num_shards, shard_index)
  base_seed = int(seed) if deterministic else secrets.randbits(62)
  entropy = [base_seed, shard[1], shard[0]] if shard else base_seed
  file_seed, shuffle_seed, augment_seed = (
      int(s) for s in np.random.SeedSequence(entropy).generate_state(3))

  ds = entry.load(split, data_dir, download, shuffle, file_seed, shard)
  ds = ds.map(lambda image, label: tf.ensure_shape(image, entry.image_shape),
              num_parallel_calls=tf.data.AUTOTUNE)
  if shuffle:
    ds = ds.shuffle(min(shuffle_buffer, entry.splits[split]), seed=shuffle_seed,
                    reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  if flip or translate_pixels > 0:
    def apply(index, image):
      key = tf.stack([tf.constant(augment_seed, tf.int64), index])
      out = augment_image(image, key, flip=flip, translate_pixels=translate_pixels,
                          translate_mode=translate_mode)
      return tf.ensure_shape(out, entry.image_shape)
    ds = ds.enumerate().map(apply, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = bool(deterministic)
  return ds.with_options(options)
