"""Builds `tfflows/data/ood_sets.npz`: real out-of-distribution images for the embedded digits.

Run: `python -m tfflows.data.make_ood_sets [--out NPZ]` (needs scikit-learn and scikit-image,
which tfflows itself does not: `pip install scikit-learn scikit-image`; built with
scikit-learn 1.9.1 and scikit-image 0.26.0).

Why: ``python -m train.main --mode=ood`` measures how well the served scores tell the
embedded MNIST digits from other images, and the machines have no dataset downloads. These two
sets are real images that ship inside PyPI wheels; none is drawn or generated here.

Sources:
  sklearn_digits  ``sklearn.datasets.load_digits()``: the 1,797 8x8 handwritten digits of the
                  UCI "Optical Recognition of Handwritten Digits" set (E. Alpaydin, C. Kaynak,
                  1998; CC BY 4.0), 0-16 grey levels. 500 of them, scaled to 0-255, resized
                  (bilinear) to 20x20 and centred in a 32x32 frame: the layout of the embedded
                  MNIST digits (MNIST fits each digit in a 20x20 box of its 28x28 image, and the
                  embedded set pads 28x28 by 2). Digits from another source: a near
                  out-of-distribution set.
  photo_patches   grey patches of the sample photographs bundled with scikit-image
                  (``skimage.data``: astronaut, brick, camera, chelsea, clock, coffee, coins,
                  grass, gravel, moon, page, rocket, text, hubble_deep_field,
                  immunohistochemistry, retina, cell; their licences are listed in
                  skimage/data/README.txt, all free to redistribute). 500 square crops with
                  a side drawn from [32, 128] pixels at random places, converted to grey
                  (ITU-R 601 luma, as PIL's 'L' mode) and resized to 32x32 (PIL's antialiased
                  box filter).

Output (`np.savez_compressed`, about 0.6 MB):
  sklearn_digits uint8 [500, 32, 32, 1], sklearn_digits_rows int16 [500] (rows of load_digits)
  photo_patches uint8 [500, 32, 32, 1], photo_patches_source int8 [500] (index into
  photo_names), photo_patches_box int16 [500, 3] (top, left, side of the crop),
  photo_names (str array).
The choice is fixed by SEED; rebuilding with the same package versions gives the same arrays.
The transforms of the test digits (inverted, flipped, noise, constant) are not stored: they are
computed from the test split by ``tfflows.data.ood_sets.transformed_sets``.
"""

import argparse
import os

import numpy as np
from PIL import Image

SEED = 20261207  # fixed: changing it changes the shipped sets
NUM_IMAGES = 500
SIZE = 32
DIGIT_BOX = 20
PATCH_SIDES = (32, 128)
PHOTOS = ('astronaut', 'brick', 'camera', 'chelsea', 'clock', 'coffee', 'coins', 'grass',
          'gravel', 'moon', 'page', 'rocket', 'text', 'hubble_deep_field',
          'immunohistochemistry', 'retina', 'cell')
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ood_sets.npz')


def sklearn_digits(rng, num=NUM_IMAGES):
  """(images uint8 [num, 32, 32, 1], rows): load_digits images in the embedded digits' layout."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits().images  # [1797, 8, 8] float, 0..16
  rows = np.sort(rng.choice(len(digits), num, replace=False))
  pad = (SIZE - DIGIT_BOX) // 2
  out = np.zeros((num, SIZE, SIZE, 1), np.uint8)
  for i, row in enumerate(rows):
    small = Image.fromarray(np.round(digits[row] * 255. / 16.).astype(np.uint8), mode='L')
    box = np.asarray(small.resize((DIGIT_BOX, DIGIT_BOX), Image.BILINEAR))
    out[i, pad:pad + DIGIT_BOX, pad:pad + DIGIT_BOX, 0] = box
  return out, rows.astype(np.int16)


def _grey(name):
  import skimage.data  # pylint: disable=import-outside-toplevel
  image = np.asarray(getattr(skimage.data, name)())
  if image.dtype != np.uint8:
    raise ValueError(f'skimage.data.{name} is {image.dtype}, expected uint8')
  if image.ndim == 3:
    return Image.fromarray(image[..., :3], mode='RGB').convert('L')
  return Image.fromarray(image, mode='L')


def photo_patches(rng, num=NUM_IMAGES):
  """(images uint8 [num, 32, 32, 1], source index [num], boxes [num, 3])."""
  photos = [_grey(name) for name in PHOTOS]
  sources = np.sort(rng.integers(0, len(photos), num))
  out = np.zeros((num, SIZE, SIZE, 1), np.uint8)
  boxes = np.zeros((num, 3), np.int16)
  for i, source in enumerate(sources):
    photo = photos[source]
    width, height = photo.size
    side = int(rng.integers(PATCH_SIDES[0], min(PATCH_SIDES[1], width, height) + 1))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = photo.crop((left, top, left + side, top + side))
    out[i, ..., 0] = np.asarray(crop.resize((SIZE, SIZE), Image.BOX))
    boxes[i] = (top, left, side)
  return out, sources.astype(np.int8), boxes


def build(out=DEFAULT_OUT, seed=SEED):
  rng = np.random.default_rng(seed)
  digits, rows = sklearn_digits(rng)
  patches, sources, boxes = photo_patches(rng)
  np.savez_compressed(out, sklearn_digits=digits, sklearn_digits_rows=rows,
                      photo_patches=patches, photo_patches_source=sources,
                      photo_patches_box=boxes, photo_names=np.array(PHOTOS))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--out', default=DEFAULT_OUT)
  args = parser.parse_args()
  path = build(args.out)
  print(f'wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB)')


if __name__ == '__main__':
  main()
