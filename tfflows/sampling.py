"""Looking at a flow: image grids, latent interpolation, and the memorisation check.

    save_image_grid(model.sample(64, temperature=0.8, seed=0), 'samples.png')
    save_image_grid(linear_interpolation(model, a, b, steps=8), 'interp.png')    # a row a pair
    idx, dist = nearest_training_images(samples, train_images, crop=42, k=5)
    save_image_grid(memorization_grid(samples, train_images, idx), 'nearest.png')

The memorisation check follows DenseFlow (Grcic et al. 2021, appendix E): for each generated
image, the k training images nearest in L2 distance over the central crop x crop window (42 x 42
of 64 x 64 ImageNet there), shown in a row beside the sample. A model that copies its training
data shows near-zero distances and look-alike rows.
"""

import io
import math

import numpy as np
import tensorflow as tf
from PIL import Image

from tfflows import atomic


# -- grids ---------------------------------------------------------------------------------------
def image_grid(images, nrow=None, padding=2, pad_value=0):
  """uint8 images -> one uint8 grid image [rows, cols, C] with ``padding`` px between and around.

  images: [N, H, W, C] (laid out ``nrow`` images a row; default ceil(sqrt(N))) or
  [R, K, H, W, C] (R rows of K images each, e.g. interpolations or memorisation rows).
  C is 1 or 3.
  """
  images = _checked_images(images, ranks=(4, 5))
  if images.ndim == 5:
    if nrow is not None and nrow != images.shape[1]:
      raise ValueError(f'nrow={nrow} contradicts rows of {images.shape[1]} images in a '
                       f'[R, K, H, W, C] array of shape {images.shape}.')
    nrow = images.shape[1]
    images = images.reshape((-1,) + images.shape[2:])
  n, height, width, channels = images.shape
  nrow = int(nrow) if nrow is not None else max(1, math.ceil(math.sqrt(n)))
  if nrow < 1:
    raise ValueError(f'nrow must be >= 1, got {nrow}.')
  if padding < 0:
    raise ValueError(f'padding must be >= 0, got {padding}.')
  cols = min(nrow, n)
  rows = math.ceil(n / nrow)
  grid = np.full((rows * (height + padding) + padding, cols * (width + padding) + padding,
                  channels), pad_value, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, nrow)
    top, left = padding + r * (height + padding), padding + c * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def save_image_grid(images, path, nrow=None, padding=2, pad_value=0):
  """Writes ``image_grid(images, nrow, padding, pad_value)`` as a PNG, atomically (a temporary
  file in the same directory renamed over ``path``). Returns the grid array."""
  grid = image_grid(images, nrow, padding, pad_value)
  picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid,
                            mode='L' if grid.shape[-1] == 1 else 'RGB')
  encoded = io.BytesIO()
  picture.save(encoded, format='PNG')
  atomic.write_bytes(path, encoded.getvalue())
  return grid


# -- interpolation -------------------------------------------------------------------------------
def linear_interpolation(model, images_a, images_b, steps):
  """Decodes (1 - t) z_a + t z_b for ``steps`` values of t from 0 to 1 (ends included).

  model: a FlowModel; images_a, images_b: uint8 [P, H, W, C] (P pairs) or single [H, W, C]
  images. Each latent of the multi-scale structure is interpolated. Returns uint8
  [P, steps, H, W, C]; the first and last images reproduce images_a and images_b exactly
  (encode dequantizes at the bin centres, and decode floors, so decode(encode(x)) == x).
  """
  images_a, images_b = _as_batch(images_a), _as_batch(images_b)
  if images_a.shape != images_b.shape:
    raise ValueError(f'images_a and images_b must have the same shape, got {images_a.shape} and '
                     f'{images_b.shape}.')
  steps = int(steps)
  if steps < 2:
    raise ValueError(f'steps must be >= 2 (the two end points included), got {steps}.')
  pairs = images_a.shape[0]
  t = np.linspace(0., 1., steps, dtype=np.float32)  # t[0] == 0 and t[-1] == 1 exactly
  latents = []
  for z_a, z_b in zip(model.encode(images_a), model.encode(images_b)):
    shape = [1, steps] + [1] * (z_a.shape.rank - 1)
    weight = tf.reshape(tf.constant(t, z_a.dtype), shape)
    z = (1. - weight) * z_a[:, None] + weight * z_b[:, None]  # [P, steps, ...]
    latents.append(tf.reshape(z, tf.concat([[pairs * steps], tf.shape(z_a)[1:]], 0)))
  images = model.decode(latents)
  return np.asarray(images).reshape((pairs, steps) + images_a.shape[1:])


# -- memorisation check --------------------------------------------------------------------------
def nearest_training_images(samples, train_images, crop=42, k=5, batch=2048):
  """The k training images nearest to each sample in L2 distance over the central crop.

  samples: uint8 [N, H, W, C]. train_images: uint8 [M, H, W, C], either an array that slices
  (a numpy array, or ``np.load(path, mmap_mode='r')`` for data larger than memory) or an
  iterable of batches (a tf.data pipeline of images or (images, ...) tuples). It is read
  ``batch`` images at a time, so 5,000 or 200k training images need only N x batch distances
  in memory. crop: side of the central window compared (42 of 64 x 64 in DenseFlow); an axis
  shorter than crop is compared whole (so 8 x 8 or 32 x 32 images are compared whole with the
  default); None compares whole images.

  Distances come from sqrt(||a||^2 + ||b||^2 - 2 a.b), one float32 matrix product a chunk, on
  pixel values centred at 127.5. For an array ``train_images`` the best k + 8 candidates are
  then re-ranked by the exact (float64) distance, so near-ties are ordered correctly and an exact
  duplicate comes out at distance 0; for an iterable the float32 distances are returned.
  Returns (indices int64 [N, k], distances float32 [N, k]), nearest first.
  """
  samples = _checked_images(samples, ranks=(4,), name='samples')
  k, batch = int(k), int(batch)
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}.')
  if batch < 1:
    raise ValueError(f'batch must be >= 1, got {batch}.')
  indexable = _is_array(train_images)
  queries = _crop_flat(samples, crop)
  query_sq = np.sum(queries * queries, axis=1)
  keep = k + 8 if indexable else k
  best_d = np.zeros((len(samples), 0), np.float32)
  best_i = np.zeros((len(samples), 0), np.int64)
  seen = 0
  for chunk in _chunks(train_images, batch):
    if chunk.shape[1:] != samples.shape[1:]:
      raise ValueError(f'train_images must have the per-image shape of the samples '
                       f'{list(samples.shape[1:])}, got a chunk of shape {list(chunk.shape)}.')
    flat = _crop_flat(chunk, crop)
    d2 = query_sq[:, None] + np.sum(flat * flat, axis=1)[None, :] - 2. * (queries @ flat.T)
    ids = np.broadcast_to(np.arange(seen, seen + len(chunk), dtype=np.int64), d2.shape)
    best_d, best_i = _smallest(np.concatenate([best_d, np.maximum(d2, 0.)], axis=1),
                               np.concatenate([best_i, ids], axis=1), keep)
    seen += len(chunk)
  if seen < k:
    raise ValueError(f'Need at least k={k} training images, got {seen}.')
  if indexable:
    best_d = _exact_squared_distances(queries, best_i, train_images, crop)
  order = np.lexsort((best_i, best_d), axis=1)[:, :k]  # by distance, ties by index
  distances = np.sqrt(np.take_along_axis(best_d, order, axis=1)).astype(np.float32)
  return np.take_along_axis(best_i, order, axis=1), distances


def _smallest(d, ids, keep):
  """The ``keep`` smallest entries of each row of d (unordered) with their ids."""
  if d.shape[1] <= keep:
    return d, ids
  top = np.argpartition(d, keep - 1, axis=1)[:, :keep]
  return np.take_along_axis(d, top, axis=1), np.take_along_axis(ids, top, axis=1)


def _exact_squared_distances(queries, indices, train_images, crop, block=256):
  """float64 squared distances of queries [N, D] to the training images indices [N, c],
  reading the candidates of ``block`` samples at a time (sorted, unique reads: memmap-friendly)."""
  out = np.empty(indices.shape, np.float64)
  for start in range(0, len(queries), block):
    idx = indices[start:start + block]
    unique, inverse = np.unique(idx, return_inverse=True)
    rows = _crop_flat(np.asarray(train_images[unique]), crop).astype(np.float64)
    diff = rows[inverse.reshape(idx.shape)] - queries[start:start + block, None].astype(np.float64)
    out[start:start + block] = np.sum(diff * diff, axis=-1)
  return out


def memorization_grid(samples, train_images, indices):
  """uint8 [N, 1 + k, H, W, C]: each sample followed by its k nearest training images (whole
  images, not the crops compared), ready for ``save_image_grid`` (one row a sample)."""
  samples = _checked_images(samples, ranks=(4,), name='samples')
  indices = np.asarray(indices)
  if indices.ndim != 2 or indices.shape[0] != samples.shape[0]:
    raise ValueError(f'indices must be [N, k] with N = {samples.shape[0]} samples, got shape '
                     f'{indices.shape}.')
  # One sorted, de-duplicated read: works for memmaps and h5py-like arrays too.
  unique, inverse = np.unique(indices, return_inverse=True)
  picked = np.asarray(train_images[unique])
  if picked.shape[1:] != samples.shape[1:]:
    raise ValueError(f'train_images have shape {list(picked.shape[1:])} per image, samples '
                     f'{list(samples.shape[1:])}.')
  neighbours = picked[inverse.reshape(indices.shape)].astype(np.uint8)
  return np.concatenate([samples[:, None], neighbours], axis=1)


# -- helpers -------------------------------------------------------------------------------------
def _checked_images(images, ranks, name='images'):
  array = np.asarray(images)
  if array.ndim not in ranks:
    shapes = ' or '.join({4: '[N, H, W, C]', 5: '[R, K, H, W, C]'}[r] for r in ranks)
    raise ValueError(f'{name} must be {shapes}, got shape {list(array.shape)}.')
  if array.dtype != np.uint8:
    raise ValueError(f'{name} must be uint8, got dtype {array.dtype}.')
  if array.shape[-1] not in (1, 3):
    raise ValueError(f'{name} must have 1 or 3 channels, got {array.shape[-1]}.')
  return array


def _as_batch(images):
  array = np.asarray(images)
  return array[None] if array.ndim == 3 else array


def _crop_flat(images, crop):
  """The central crop x crop window (whole axes smaller than crop), flattened to float32 and
  centred at 127.5 (halves the magnitudes, so the float32 expansion loses less)."""
  if crop is not None:
    height, width = images.shape[1:3]
    ch, cw = min(int(crop), height), min(int(crop), width)
    top, left = (height - ch) // 2, (width - cw) // 2
    images = images[:, top:top + ch, left:left + cw]
  return images.reshape(len(images), -1).astype(np.float32) - 127.5


def _is_array(values):
  return (hasattr(values, 'shape') and hasattr(values, '__getitem__')
          and not isinstance(values, tf.data.Dataset))


def _chunks(train_images, batch):
  """uint8 numpy chunks of at most ``batch`` images."""
  if _is_array(train_images):
    for start in range(0, len(train_images), batch):
      yield np.asarray(train_images[start:start + batch])
  else:
    for chunk in train_images:
      chunk = np.asarray(chunk[0] if isinstance(chunk, (tuple, list)) else chunk)
      for start in range(0, len(chunk), batch):
        yield chunk[start:start + batch]
