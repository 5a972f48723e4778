"""Reader for the image-net.org "downsampled ImageNet" npz batches (ImageNet32 / ImageNet64).

This is the ImageNet32/64 version DenseFlow and most flow papers report on (Chrabaszcz et al.
2017, box-resized). Each npz holds `data` uint8 [N, 3*H*W], channel-major per row (the whole
R plane, then G, then B, each row-major), and `labels` [N] in 1..1000; the reader yields
images uint8 [H, W, 3] and labels 0..999.

Files as unzipped from image-net.org (Downsampled ImageNet, login required):
  Imagenet32_train_npz.zip        -> train_data_batch_1.npz ... train_data_batch_10.npz
  Imagenet32_val_npz.zip          -> val_data.npz
  Imagenet64_train_part1_npz.zip  -> train_data_batch_1.npz ... train_data_batch_5.npz
  Imagenet64_train_part2_npz.zip  -> train_data_batch_6.npz ... train_data_batch_10.npz
  Imagenet64_val_npz.zip          -> val_data.npz
(each inside a folder named like the zip). Discovery is tolerant: every `*.npz` anywhere under
`data_dir` whose name contains 'train' (or 'val') and whose rows have 3*H*W values counts, so
renamed files (`Imagenet64_train_part1.npz`) and 32 and 64 px files side by side both work.

Files are streamed: the `data` member is read from the zip in chunks, so memory stays at a
few MB per open file instead of 1.5 GB per ImageNet64 batch.
"""

import os
import re
import zipfile

import numpy as np
import tensorflow as tf

from tfflows.data import sharding

NUM_EXAMPLES = {'train': 1_281_167, 'val': 50_000}
SPLIT_ALIASES = {'train': 'train', 'val': 'val', 'validation': 'val', 'test': 'val'}
DOWNLOAD_URL = 'https://image-net.org/download-images (Downsampled ImageNet)'
_ZIPS = {
    32: {'train': ['Imagenet32_train_npz.zip'], 'val': ['Imagenet32_val_npz.zip']},
    64: {'train': ['Imagenet64_train_part1_npz.zip', 'Imagenet64_train_part2_npz.zip'],
         'val': ['Imagenet64_val_npz.zip']},
}
_EXPECTED = {
    32: {'train': 'Imagenet32_train_npz/train_data_batch_1.npz ... train_data_batch_10.npz',
         'val': 'Imagenet32_val_npz/val_data.npz'},
    64: {'train': 'Imagenet64_train_part1_npz/train_data_batch_1.npz ... _5.npz and '
                  'Imagenet64_train_part2_npz/train_data_batch_6.npz ... _10.npz',
         'val': 'Imagenet64_val_npz/val_data.npz'},
}


def canonical_split(split):
  """Maps 'train' / 'val' / 'validation' / 'test' to 'train' or 'val'."""
  try:
    return SPLIT_ALIASES[split]
  except KeyError:
    raise ValueError(f'downsampled ImageNet has splits train and val (aliases validation, '
                     f'test), not {split!r}') from None


def missing_message(resolution, split, data_dir, detail=''):
  """The error text for absent files: what is expected where, and how to get it."""
  zips = ' and '.join(_ZIPS[resolution][split])
  return (
      f'ImageNet{resolution} {split} npz files not found under data_dir={data_dir!r} '
      f'(`--data_dir` of train.main)'
      f'{": " + detail if detail else ""}. Expected {_EXPECTED[resolution][split]} '
      f'(any *{split}*.npz under data_dir with rows of {3 * resolution ** 2} values). '
      f'Get them from {DOWNLOAD_URL}: download {zips} and unzip into data_dir, e.g. '
      f'`unzip {_ZIPS[resolution][split][0]} -d {data_dir or "DATA_DIR"}`. '
      f'Alternatively prepare the TFDS dataset imagenet_resized/{resolution}x{resolution} in '
      f'data_dir (same images) on a machine with network: '
      f'`tfds build imagenet_resized/{resolution}x{resolution} --data_dir DATA_DIR`.')


def _natural_key(path):
  return [int(t) if t.isdigit() else t.lower() for t in re.split(r'(\d+)', path)]


def _open_member(zf, key):
  """Opens `key`.npy inside an open npz zip; returns (stream, shape, dtype) past the header."""
  stream = zf.open(key + '.npy')
  version = np.lib.format.read_magic(stream)
  if version == (1, 0):
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
  else:
    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
  if fortran_order or dtype.hasobject:
    stream.close()
    raise ValueError(f'{key}.npy is Fortran-ordered or an object array; cannot stream it')
  return stream, shape, dtype


def data_shape(path):
  """Shape of the `data` array in an npz, read from its header only (no decompression)."""
  with zipfile.ZipFile(path) as zf:
    stream, shape, _ = _open_member(zf, 'data')
    stream.close()
  return shape


def find_files(data_dir, resolution, split):
  """The npz files of one split and resolution under `data_dir`, in natural order.

  Raises FileNotFoundError (nothing there) or ValueError (npz files of another resolution),
  with a message naming the expected files and where to get them.
  """
  split = canonical_split(split)
  if resolution not in _ZIPS:
    raise ValueError(f'downsampled ImageNet resolution must be 32 or 64, not {resolution}')
  if data_dir is None or not os.path.isdir(data_dir):
    raise FileNotFoundError(missing_message(
        resolution, split, data_dir, 'no data_dir given' if data_dir is None
        else 'the directory does not exist'))
  named, wrong = [], []
  for root, _, names in os.walk(data_dir, followlinks=True):
    for name in names:
      if name.lower().endswith('.npz') and split in name.lower():
        named.append(os.path.join(root, name))
  matched = []
  for path in sorted(named, key=_natural_key):
    try:
      shape = data_shape(path)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
      wrong.append(f'{path} ({type(e).__name__}: {e})')
      continue
    if len(shape) == 2 and shape[1] == 3 * resolution ** 2:
      matched.append(path)
    else:
      wrong.append(f'{path} (data shape {shape})')
  if not matched:
    if wrong:
      raise ValueError(missing_message(
          resolution, split, data_dir, 'found only unusable npz files: ' + '; '.join(wrong)))
    raise FileNotFoundError(missing_message(resolution, split, data_dir))
  return matched


def decode_rows(rows, resolution):
  """Channel-major rows [N, 3*H*W] -> images uint8 [N, H, W, 3]."""
  rows = np.asarray(rows)
  images = rows.reshape(-1, 3, resolution, resolution).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images.astype(np.uint8, copy=False))


def iter_file(path, resolution, chunk=1024):
  """Yields (images uint8 [n, H, W, 3], labels int64 [n], 0-based) chunks of one npz file."""
  with np.load(path, allow_pickle=False) as npz:
    labels = np.asarray(npz['labels']).astype(np.int64).reshape(-1) - 1
  with zipfile.ZipFile(path) as zf:
    stream, shape, dtype = _open_member(zf, 'data')
    with stream:
      n, row = shape
      if row != 3 * resolution ** 2:
        raise ValueError(f'{path}: rows of {row} values, expected {3 * resolution ** 2}')
      if n != len(labels):
        raise ValueError(f'{path}: {n} images but {len(labels)} labels')
      row_bytes = row * dtype.itemsize
      for start in range(0, n, chunk):
        count = min(chunk, n - start)
        buf = stream.read(count * row_bytes)
        if len(buf) != count * row_bytes:
          raise ValueError(f'{path}: data ends early at image {start}')
        rows = np.frombuffer(buf, dtype=dtype).reshape(count, row)
        yield decode_rows(rows, resolution), labels[start:start + count]


def load_imagenet_npz(split, resolution, data_dir, *, shuffle_files=False, seed=0,
                      chunk=1024, shard=None):
  """tf.data.Dataset of (image uint8 [H, W, 3], label int64) from the npz batches.

  Streams file by file. shuffle_files: visit the files in a seeded random order (new each
  epoch) and interleave two files at a time, so a shuffle buffer downstream mixes sources;
  otherwise files are read one after another in natural order (batch_2 before batch_10).
  shard: None or (num_shards, shard_index): shard i of n reads files i, i + n, ... when the
  files divide evenly among the shards (10 train files: 2, 5 or 10 shards), else every file,
  keeping images i, i + n, ... of the stream (the one val file always so).
  """
  files, whole = sharding.shard_files(find_files(data_dir, resolution, split), shard)
  spec = (tf.TensorSpec([None, resolution, resolution, 3], tf.uint8),
          tf.TensorSpec([None], tf.int64))

  def one_file(path):
    return tf.data.Dataset.from_generator(
        lambda p: iter_file(p.decode() if isinstance(p, bytes) else p, resolution, chunk),
        output_signature=spec, args=(path,))

  ds = tf.data.Dataset.from_tensor_slices(files)
  if shuffle_files and len(files) > 1:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  # Sequential interleave (no num_parallel_calls): the chunk order is deterministic.
  ds = ds.interleave(one_file, cycle_length=2 if shuffle_files else 1, block_length=1)
  ds = ds.unbatch()
  return ds if whole else ds.shard(*shard)
