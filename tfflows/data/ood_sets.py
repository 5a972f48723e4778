"""Out-of-distribution image sets for models of the embedded digits (``--mode=ood``).

    sets = ood_sets(test_images, seed=0)   # {name: uint8 [N, H, W, C]} in the test images' shape

Two stored sets of real images, built offline from data inside PyPI wheels by
``python -m tfflows.data.make_ood_sets`` (see that module for sources and licences) and shipped
as ``ood_sets.npz`` beside the embedded digits (32x32x1):

  sklearn_digits   500 of scikit-learn's 8x8 handwritten digits, in the MNIST layout
  photo_patches    500 grey patches of scikit-image's sample photographs

and four transforms of the in-distribution test images, computed here (``transformed_sets``):

  inverted   255 - x (white background, dark strokes)
  flipped    mirrored left-right (digits are not mirror-symmetric)
  noise      i.i.d. uniform pixels in {0..255}, one image per test image
  constant   every pixel of an image one value, drawn uniformly from {0..255}

The stored sets are resized to another image shape when the model's is not 32x32x1 (bilinear,
antialiased, then rounded; grey repeated over the channels).
"""

import functools

import numpy as np

from tfflows.data import embedded

RESOURCE = 'ood_sets.npz'
STORED = ('sklearn_digits', 'photo_patches')
TRANSFORMS = ('inverted', 'flipped', 'noise', 'constant')
NAMES = STORED + TRANSFORMS


@functools.lru_cache(maxsize=1)
def _arrays():
  arrays = embedded.read_shipped_npz(
      RESOURCE, 'python -m tfflows.data.make_ood_sets')
  return {k: arrays[k] for k in STORED}


def stored_sets(image_shape=(32, 32, 1)):
  """{name: uint8 [500, H, W, C]} of the two stored sets, resized to ``image_shape``."""
  return {name: resize(images, image_shape) for name, images in _arrays().items()}


def transformed_sets(images, seed=0):
  """{name: uint8 [N, H, W, C]}: the four transforms of ``images`` (uint8 [N, H, W, C]).
  noise and constant draw from ``np.random.default_rng(seed)``."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'Expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}.')
  rng = np.random.default_rng(seed)
  constant = rng.integers(0, 256, size=(len(images), 1, 1, 1), dtype=np.uint8)
  return {
      'inverted': 255 - images,
      'flipped': images[:, :, ::-1, :].copy(),
      'noise': rng.integers(0, 256, size=images.shape, dtype=np.uint8),
      'constant': np.broadcast_to(constant, images.shape).copy(),
  }


def ood_sets(test_images, seed=0):
  """Every set of NAMES in the shape of ``test_images`` (uint8 [N, H, W, C])."""
  test_images = np.asarray(test_images)
  sets = stored_sets(test_images.shape[1:])
  sets.update(transformed_sets(test_images, seed))
  return {name: sets[name] for name in NAMES}


def resize(images, image_shape):
  """uint8 grey images [N, h, w, 1] -> uint8 [N, H, W, C] (identity for the same shape)."""
  height, width, channels = (int(d) for d in image_shape)
  if images.shape[1:] == (height, width, channels):
    return images
  if images.shape[1:3] != (height, width):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    images = tf.image.resize(images.astype(np.float32), (height, width), 'bilinear',
                             antialias=True).numpy()
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  return np.repeat(images[..., :1], channels, axis=-1)
