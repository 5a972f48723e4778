"""Fixed, data-chosen permutations for LCMA (Das, Abbeel & Spanos): the ordered squeeze.

Index maps. Every fixed rearrangement of an event here is written as a flat index array
``idx`` with  y_flat[i] = x_flat[idx[i]]  (row-major (H, W, C) flattening), the convention of
``bijectors.FlatPermutation``. Applying a rearrangement to ``np.arange(H*W*C)`` gives its index
map, so the numpy functions below both compute index maps and move score maps around.

Standard squeeze (``bijectors.squeeze``), channel c*4 + 2*dy + dx:

    squeeze_np(x)[i, j, 4c + 2dy + dx] = x[2i + dy, 2j + dx, c]

Ordered squeeze of a score map S [H, W, C] (the LCMA squeeze: local max- and min-pooling).
For every 2x2 window (i, j) and channel c, rank its four values S[2i + dy, 2j + dx, c]
from the largest (rank 0) to the smallest (rank 3); ties go to the smaller sub-pixel index
2*dy + dx, so the order is deterministic. Then, for an x of the same layout:

    high half  y[i, j,      2c + r] = the value of rank r       r = 0: max-pooling,
                                                                r = 1: the second largest
    low half   y[i, j, 2C + 2c + r] = the value of rank 3 - r   r = 0: min-pooling
                                                                (= -max-pooling(-S)),
                                                                r = 1: the second smallest
    (H, W, C) -> (H/2, W/2, 4C); with high_first=False the halves swap: y = [low | high].

Half of the 4C channels hold, per window and channel, the two locally higher-scoring dimensions
and half the two locally lower ones, and both halves keep one value per window, so each half is
still a full-resolution picture of the image (the paper's "spatiality").

Split permutation of a level (what the multi-scale builders insert before the split). A level
of RealNVP or Glow ends with its tensor in the standard-squeezed layout (h, w, 4c); the
permutation that makes the split factor out LCMA's choice is

    P = ordered_squeeze(S) o unsqueeze         (h, w, 4c) -> (h, w, 4c),   log|det| = 0

whose index map is  unsqueeze_index[ordered_index]. Because unsqueeze sends the 4c channels at
(i, j) to the 2x2 window (i, j), P only reorders the 4c channels *within* each position (i, j),
by a different permutation at every position; the split then keeps the first 2c channels.
"""

import numpy as np

from bijectors import permute


def squeeze_np(x):
  """numpy ``bijectors.squeeze`` of one event [H, W, C] -> [H/2, W/2, 4C] (c*4 + 2dy + dx)."""
  h, w, c = _hwc(x)
  if h % 2 or w % 2:
    raise ValueError(f'squeeze needs even height and width, got shape {x.shape}.')
  t = np.reshape(x, [h // 2, 2, w // 2, 2, c]).transpose(0, 2, 4, 1, 3)
  return np.reshape(t, [h // 2, w // 2, 4 * c])


def unsqueeze_np(y):
  """numpy ``bijectors.unsqueeze`` of one event [H, W, 4C] -> [2H, 2W, C]."""
  h, w, c4 = _hwc(y)
  if c4 % 4:
    raise ValueError(f'unsqueeze needs a channel count divisible by 4, got shape {y.shape}.')
  t = np.reshape(y, [h, w, c4 // 4, 2, 2]).transpose(0, 3, 1, 4, 2)
  return np.reshape(t, [2 * h, 2 * w, c4 // 4])


def unsqueeze_index(shape):
  """Index map of unsqueeze on events of ``shape`` (h, w, 4c): flat [h*w*4c]."""
  h, w, c4 = (int(d) for d in shape)
  return unsqueeze_np(np.arange(h * w * c4).reshape(h, w, c4)).ravel()


def ordered_squeeze_index(scores, high_first=True):
  """Index map of the ordered squeeze of ``scores`` [H, W, C] (see the module docstring).

  Returns an int array [H*W*C]: y_flat[i] = x_flat[idx[i]] with y of shape (H/2, W/2, 4C).
  """
  scores = np.asarray(scores, dtype=np.float64)
  h, w, c = _hwc(scores)
  if h % 2 or w % 2:
    raise ValueError(f'the ordered squeeze needs even height and width, got {scores.shape}.')
  if not np.all(np.isfinite(scores)):
    raise ValueError('the score map of the ordered squeeze holds NaN or Inf values.')
  windows = _windows(scores)                                   # [h/2, w/2, c, 4]
  index = _windows(np.arange(h * w * c).reshape(h, w, c))
  rank = np.argsort(-windows, axis=-1, kind='stable')          # largest first, ties: k order
  ranked = np.take_along_axis(index, rank, axis=-1)            # [..., 0] max ... [..., 3] min
  high = ranked[..., :2].reshape(h // 2, w // 2, 2 * c)        # 2c + r: rank r
  low = ranked[..., ::-1][..., :2].reshape(h // 2, w // 2, 2 * c)   # 2c + r: rank 3 - r
  halves = [high, low] if high_first else [low, high]
  return np.concatenate(halves, axis=-1).ravel().astype(np.int64)


def split_permutation_index(scores, high_first=True):
  """Index map of P = ordered_squeeze(scores) o unsqueeze on the level output (h, w, 4c).

  scores: [2h, 2w, c], the score of every dimension in the *unsqueezed* layout (the level's
  input layout before its squeeze).
  """
  scores = np.asarray(scores)
  h2, w2, c = _hwc(scores)
  return unsqueeze_index((h2 // 2, w2 // 2, 4 * c))[ordered_squeeze_index(scores, high_first)]


class OrderedSqueeze(permute.FlatPermutation):
  """The ordered squeeze of a fixed score map as a bijector: (H, W, C) -> (H/2, W/2, 4C).

  A drop-in replacement of ``bijectors.Squeeze`` whose channel order follows the scores
  (log|det| = 0). tfflows' builders keep the standard squeeze and use ``SplitPermutation``
  instead (same split, unchanged couplings); this form is for flows that squeeze right before
  a split.
  """

  def __init__(self, scores, high_first=True, name='ordered_squeeze'):
    scores = np.asarray(scores)
    h, w, c = _hwc(scores)
    super().__init__(ordered_squeeze_index(scores, high_first), (h, w, c),
                     (h // 2, w // 2, 4 * c), name=name)


class SplitPermutation(permute.FlatPermutation):
  """A fixed permutation of a level's output (h, w, c) applied right before its split.

  ``perm`` is a flat index map (y_flat[i] = x_flat[perm[i]]): LCMA's
  ``split_permutation_index`` or a random permutation. log|det| = 0; ``forward`` then the
  split keeps y[..., :c // 2] and factors out y[..., c // 2:].
  """

  def __init__(self, perm, shape, name='split_permutation'):
    super().__init__(perm, shape, shape, name=name)


def _windows(x):
  """[H, W, C] -> [H/2, W/2, C, 4] with the last axis the sub-pixel k = 2*dy + dx."""
  h, w, c = x.shape
  return np.reshape(x, [h // 2, 2, w // 2, 2, c]).transpose(0, 2, 4, 1, 3).reshape(
      h // 2, w // 2, c, 4)


def _hwc(x):
  if np.ndim(x) != 3:
    raise ValueError(f'expected one event of shape (H, W, C), got shape {np.shape(x)}.')
  return tuple(int(d) for d in np.shape(x))
