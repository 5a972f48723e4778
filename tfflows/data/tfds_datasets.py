"""TensorFlow Datasets sources: mnist, cifar10, celeb_a, imagenet_resized/{32x32,64x64}.

Each loader returns a tf.data.Dataset of (image uint8 [H, W, C], label int64) with the
project's preprocessing: MNIST zero-padded to 32x32, CelebA centre-cropped to 148x148 and
box-resized to 64x64 (the DenseFlow / Glow protocol; DenseFlow's public code forgets the crop).
CelebA has no class label; its label is -1.

`download=False` by default: these machines have no network, so a missing dataset raises a
FileNotFoundError naming the dataset, the data_dir and the command that prepares it, instead
of tfds trying (and failing) to download. `tensorflow_datasets` is imported lazily.
"""

import contextlib
import dataclasses
import logging
import os
import re

import tensorflow as tf

from tfflows.data import sharding

CELEBA_CROP = 148
CELEBA_SIZE = 64


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TFDS dataset and how its examples map to (image, label)."""
  tfds_name: str
  splits: dict  # our split name -> TFDS split name
  preprocess: object  # uint8 image -> uint8 image
  has_label: bool = True


def pad_mnist(image):
  """uint8 [28, 28, 1] -> [32, 32, 1], 2 zero pixels on every side."""
  return tf.pad(image, [[2, 2], [2, 2], [0, 0]])


def celeba_crop_resize(image, crop=CELEBA_CROP, size=CELEBA_SIZE):
  """CelebA uint8 [..., 218, 178, 3] -> uint8 [..., size, size, 3].

  Takes the central crop x crop window (rows 35..182, columns 15..162 at 218x178), then
  resizes with area (box) averaging, which antialiases, and rounds back to uint8.
  """
  image = tf.convert_to_tensor(image)
  h, w = image.shape[-3], image.shape[-2]
  if h is None or w is None:
    h, w = tf.shape(image)[-3], tf.shape(image)[-2]
  top, left = (h - crop) // 2, (w - crop) // 2
  image = image[..., top:top + crop, left:left + crop, :]
  resized = tf.image.resize(tf.cast(image, tf.float32), [size, size], method='area')
  return tf.cast(tf.clip_by_value(tf.round(resized), 0., 255.), tf.uint8)


SOURCES = {
    'mnist': TfdsSource('mnist', {'train': 'train', 'test': 'test'}, pad_mnist),
    'cifar10': TfdsSource('cifar10', {'train': 'train', 'test': 'test'}, lambda x: x),
    'celeba64': TfdsSource('celeb_a', {'train': 'train', 'validation': 'validation',
                                       'val': 'validation', 'test': 'test'},
                           celeba_crop_resize, has_label=False),
    'imagenet32': TfdsSource('imagenet_resized/32x32',
                             {'train': 'train', 'val': 'validation',
                              'validation': 'validation', 'test': 'validation'}, lambda x: x),
    'imagenet64': TfdsSource('imagenet_resized/64x64',
                             {'train': 'train', 'val': 'validation',
                              'validation': 'validation', 'test': 'validation'}, lambda x: x),
}


def prepare_command(tfds_name, data_dir):
  """Shell command that prepares `tfds_name` in `data_dir` (on a machine with network)."""
  target = data_dir or 'DATA_DIR'
  cmd = (f'`tfds build {tfds_name} --data_dir {target}` on a machine with network (or '
         f'tfds.load({tfds_name!r}, data_dir={target!r}, download=True) in Python), then copy '
         f'{target} here')
  if tfds_name == 'celeb_a':
    cmd += '; CelebA downloads from Google Drive, which often rate-limits, so retry later'
  if tfds_name.startswith('imagenet_resized'):
    cmd += '; or use the image-net.org npz batches directly (see tfflows.data.imagenet_npz)'
  return cmd


class _AbsentFolderWarnings(logging.Filter):
  """Drops TFDS' warning "Variant folder X has no dataset_info.json" when X does not exist:
  the dataset is simply not prepared, which the error raised next says."""

  def filter(self, record):
    match = re.search(r'Variant folder (\S+) has no dataset_info\.json', record.getMessage())
    return match is None or tf.io.gfile.exists(match.group(1))


@contextlib.contextmanager
def _no_warnings_about_absent_folders():
  logger = logging.getLogger('absl')  # TFDS logs through absl.logging
  record_filter = _AbsentFolderWarnings()
  logger.addFilter(record_filter)
  try:
    yield
  finally:
    logger.removeFilter(record_filter)


def not_prepared_message(name, split, data_dir, where):
  """The error text for a TFDS dataset that is not in the data directory."""
  source = SOURCES[name]
  given = f'data_dir={data_dir!r}' if data_dir else f'the default data_dir {where!r}'
  return (f'TFDS dataset {source.tfds_name!r} (for {name!r}, split {split!r}) is not prepared in '
          f'{given} (`--data_dir` of train.main). Prepare it with '
          f'{prepare_command(source.tfds_name, data_dir or where)}.')


def load_tfds(name, split, data_dir=None, *, download=False, shuffle_files=False, seed=0,
              shard=None):
  """tf.data.Dataset of (image uint8, label int64) for one of `SOURCES`.

  name: 'mnist', 'cifar10', 'celeba64', 'imagenet32', 'imagenet64'.
  data_dir: TFDS data directory (None: TFDS' default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
  Raises FileNotFoundError naming the directory and the command that prepares the dataset
  when it is missing (and download is False).
  download: let TFDS download and prepare missing data (needs network).
  shuffle_files: seeded shuffling of the TFDS shard order.
  shard: None or (num_shards, shard_index): by file (TFDS' own input_context sharding) when
  the split's files divide evenly among the shards, else the shard_index-th of num_shards
  even ranges of examples (``tfds.even_splits``, which reads only that range's files).
  """
  if name not in SOURCES:
    raise ValueError(f'no TFDS source {name!r}; known: {sorted(SOURCES)}')
  source = SOURCES[name]
  if split not in source.splits:
    raise ValueError(f'{name} has splits {sorted(source.splits)}, not {split!r}')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = data_dir or tfds.core.constants.DATA_DIR
  tfds_split = source.splits[split]
  try:
    with _no_warnings_about_absent_folders():
      tfds_split, input_context = shard_split(tfds, source.tfds_name, tfds_split, data_dir,
                                               shard)
      read_config = None
      if shuffle_files or input_context:
        read_config = tfds.ReadConfig(shuffle_seed=seed if shuffle_files else None,
                                      input_context=input_context)
      ds = tfds.load(source.tfds_name, split=tfds_split, data_dir=data_dir,
                     download=download, shuffle_files=shuffle_files, read_config=read_config)
  except (AssertionError, FileNotFoundError, OSError, KeyError,
          tfds.core.registered.DatasetNotFoundError) as e:
    message = not_prepared_message(name, split, data_dir, where)
    if tf.io.gfile.exists(os.path.join(where, source.tfds_name.split('/')[0])):
      message += f' (TFDS said: {type(e).__name__}: {e})'  # a folder, but not a usable one
    raise FileNotFoundError(message) from e

  def convert(example):
    image = source.preprocess(example['image'])
    label = example['label'] if source.has_label else tf.constant(-1, tf.int64)
    return image, tf.cast(label, tf.int64)

  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def shard_split(tfds, tfds_name, tfds_split, data_dir, shard):
  """(split, tf.distribute.InputContext or None) that read one shard of a TFDS split."""
  if not shard:
    return tfds_split, None
  num_files = tfds.builder(tfds_name, data_dir=data_dir).info.splits[tfds_split].num_shards
  if sharding.by_file(num_files, shard):
    return tfds_split, tf.distribute.InputContext(num_input_pipelines=shard[0],
                                                  input_pipeline_id=shard[1])
  return tfds.even_splits(tfds_split, shard[0])[shard[1]], None
