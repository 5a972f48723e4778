"""The fixed permutations that multi-scale builders insert right before a split.

RealNVP and Glow (``tfflows.models``) accept ``config.split``:

    static        no permutation: the split keeps the first half of the channels
    random        a fixed random permutation of the level's h*w*c dimensions
    lcma          LCMA's choice (Das, Abbeel & Spanos), read from config.lcma_masks: the
                  dimensions of locally higher log-det contribution go on
    lcma_reverse  the same with the halves swapped (the high ones are factored out)

``split_permutation_fn(config)`` is the builders' hook; it returns, per level, a
``bijectors.ordered.SplitPermutation`` (log|det| = 0). This module is a building block below
the models: it needs the bijectors and the masks file, never a model. The analysis that computes
the contributions from a pre-trained flow (``tfflows.lcma``) sits above the models and writes
the file with ``write_masks``.

Choosing the halves (``level_permutations``). Following the kept dimensions level by level:

    ids_0 = arange(H*W*C) as [H, W, C]                     (origin of every position)
    level s:  ids  = squeeze(ids)                          the level's standard squeeze
              S    = unsqueeze(by_origin[s][ids])          map of the level's input layout
              P_s  = ordered_squeeze(S) o unsqueeze        (bijectors.ordered), [high | low]
              ids  = P_s(ids)[..., :c/2]                   the kept half goes on

lcma keeps the high half (factors out the low), lcma_reverse keeps the low half. Each arm
follows its *own* kept dimensions, so from level 1 on the two are not complements of each
other (at level 0 they are). ``random`` is a uniformly random permutation of the level's
h*w*c dimensions (no spatial structure), from ``np.random.RandomState([seed, level])``.

The masks file (``write_masks`` / ``load_masks``): an ``.npz`` (no pickles) holding
``format`` ('tfflows-lcma-masks/1'), ``metadata`` (JSON: image_shape, level_shapes,
random_seed, num_examples, source), ``contributions`` [num_splits, H*W*C] float64 and
``perm_<mode>_<level>`` int32 index maps of every level for lcma, lcma_reverse and random. A
model rebuilt from a config reads the permutations stored there (not recomputed), so it is
the same model whatever later code changes. A SavedModel holds the permutations as graph
constants and does not need the file; rebuilding a Python model from an exported config does
(``bundle_masks`` copies the file beside an export and points the config at the copy).
"""

import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile

import numpy as np

from bijectors import ordered
from bijectors import permute
from tfflows import atomic

FORMAT = 'tfflows-lcma-masks/1'
MODES = ('lcma', 'lcma_reverse', 'random')
RANDOM_SPLIT_SEED = 0  # seed of the fixed random split permutations (stored in the file too)
MASKS_NAME = 'lcma_masks.npz'


# ------------------------------------------------------------------ permutation construction


def level_shapes(image_shape, num_splits):
  """Shapes (h, w, c) of the level outputs at each split: (H/2^(s+1), W/2^(s+1), C*2^(s+2)),
  the same for RealNVP (num_scales = num_splits + 1) and Glow (num_levels = num_splits + 1)."""
  h, w, c = (int(d) for d in image_shape)
  shapes = []
  for _ in range(num_splits):
    if h % 2 or w % 2:
      raise ValueError(f'{num_splits} splits need H and W divisible by {2 ** num_splits}; '
                       f'image_shape is {tuple(image_shape)}.')
    h, w, c = h // 2, w // 2, 4 * c
    shapes.append((h, w, c))
    c //= 2
  return shapes


def level_permutations(by_origin, image_shape, mode, seed=RANDOM_SPLIT_SEED):
  """One flat index map per split (see the module docstring) for mode lcma | lcma_reverse |
  random | static (identity). by_origin: [num_splits, H*W*C] contributions (ignored by random
  and static, which only use its first dimension)."""
  if mode not in MODES + ('static',):
    raise ValueError(f'mode must be one of {MODES + ("static",)}, got {mode!r}.')
  by_origin = np.asarray(by_origin, dtype=np.float64)
  h, w, c = (int(d) for d in image_shape)
  if by_origin.ndim != 2 or by_origin.shape[1] != h * w * c:
    raise ValueError(f'contributions must have shape [num_splits, {h * w * c}], got '
                     f'{by_origin.shape}.')
  ids = np.arange(h * w * c).reshape(h, w, c)
  perms = []
  for s, shape in enumerate(level_shapes(image_shape, by_origin.shape[0])):
    ids = ordered.squeeze_np(ids)
    size = int(np.prod(shape))
    if mode == 'static':
      perm = np.arange(size)
    elif mode == 'random':
      perm = random_permutation(size, s, seed)
    else:
      scores = ordered.unsqueeze_np(by_origin[s][ids])
      perm = ordered.split_permutation_index(scores, high_first=(mode == 'lcma'))
    perms.append(perm.astype(np.int32))
    ids = ids.ravel()[perm].reshape(shape)[..., :shape[-1] // 2]
  return perms


def random_permutation(size, level, seed=RANDOM_SPLIT_SEED):
  """The fixed random split permutation of a level (numpy's legacy RandomState, whose streams
  are frozen across numpy versions)."""
  return np.random.RandomState([int(seed), int(level)]).permutation(size)


def factored_origins(perms, image_shape):
  """For each split, the sorted origin indices of the dimensions it factors out, and last the
  origins that reach the top: follows the kept half through the permutations."""
  h, w, c = (int(d) for d in image_shape)
  ids = np.arange(h * w * c).reshape(h, w, c)
  out = []
  for perm, shape in zip(perms, level_shapes(image_shape, len(perms))):
    ids = ordered.squeeze_np(ids).ravel()[perm].reshape(shape)
    out.append(np.sort(ids[..., shape[-1] // 2:].ravel()))
    ids = ids[..., :shape[-1] // 2]
  out.append(np.sort(ids.ravel()))
  return out


# ----------------------------------------------------------------------------- masks file


@dataclasses.dataclass
class LcmaMasks:
  """The content of a masks file."""

  image_shape: tuple
  level_shapes: list
  contributions: np.ndarray
  permutations: dict  # mode -> list of int32 index maps, one per split
  metadata: dict

  @property
  def num_splits(self):
    return len(self.level_shapes)


def write_masks(path, contributions, image_shape=None, metadata=None, seed=RANDOM_SPLIT_SEED):
  """Writes the masks file for ``contributions`` (a ``tfflows.lcma.Contributions`` or an array
  [num_splits, H*W*C] with ``image_shape``). Atomic: a temporary file renamed into place.
  Returns the path."""
  if hasattr(contributions, 'by_origin'):   # a tfflows.lcma.Contributions
    image_shape = contributions.image_shape
    num_examples = contributions.num_examples
    by_origin = contributions.by_origin
  else:
    if image_shape is None:
      raise ValueError('write_masks needs image_shape with a contribution array.')
    by_origin, num_examples = np.asarray(contributions, dtype=np.float64), None
  image_shape = tuple(int(d) for d in image_shape)
  shapes = level_shapes(image_shape, by_origin.shape[0])
  meta = {'image_shape': list(image_shape), 'level_shapes': [list(s) for s in shapes],
          'random_seed': int(seed), 'num_examples': num_examples}
  meta.update(metadata or {})
  arrays = {'format': np.array(FORMAT), 'metadata': np.array(json.dumps(meta, sort_keys=True)),
            'contributions': by_origin.astype(np.float64)}
  for mode in MODES:
    for s, perm in enumerate(level_permutations(by_origin, image_shape, mode, seed)):
      arrays[f'perm_{mode}_{s}'] = perm
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return atomic.write_bytes(path, buffer.getvalue())


def load_masks(path):
  """Reads and checks a masks file; returns ``LcmaMasks``. Raises FileNotFoundError or
  ValueError naming the problem."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'LCMA masks file {path!r} not found (relative paths are read from the working '
        f'directory {os.getcwd()!r}). Write it with --mode=lcma_analyze '
        '(tfflows.lcma.run_lcma_analyze) from a RealNVP pre-trained with --split=none.')
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except Exception as e:  # a zip or npy error: not our file
    raise ValueError(f'{path!r} is not an LCMA masks file (.npz): {e}') from e
  if 'format' not in arrays or str(arrays['format']) != FORMAT:
    raise ValueError(f'{path!r} is not an LCMA masks file of format {FORMAT!r} '
                     f'(format: {arrays.get("format")!r}).')
  meta = json.loads(str(arrays['metadata']))
  image_shape = tuple(meta['image_shape'])
  shapes = [tuple(s) for s in meta['level_shapes']]
  if shapes != level_shapes(image_shape, len(shapes)):
    raise ValueError(f'{path!r}: level_shapes {shapes} do not fit image_shape {image_shape}.')
  perms = {}
  for mode in MODES:
    perms[mode] = []
    for s, shape in enumerate(shapes):
      key = f'perm_{mode}_{s}'
      if key not in arrays:
        raise ValueError(f'{path!r} lacks {key}: the file is truncated or from another tool.')
      perms[mode].append(permute.validate_permutation(arrays[key], int(np.prod(shape)),
                                                      what=f'{path}:{key}'))
  return LcmaMasks(image_shape, shapes, arrays['contributions'], perms, meta)


# ------------------------------------------------------------------------- model builders


def split_permutation_fn(config):
  """The ``split_permutation(level_index, shape)`` hook of the builders for config.split, or
  None for static / none (no permutation).

  random: the fixed random permutation (seed RANDOM_SPLIT_SEED, or the seed stored in
  config.lcma_masks when one is given). lcma / lcma_reverse: the stored permutations of
  config.lcma_masks; the image shape and every level shape must match the file.
  """
  split = config.split
  if split in ('static', 'none'):
    return None
  if split == 'random' and not config.lcma_masks:
    def random_split(level, shape):
      perm = random_permutation(int(np.prod(shape)), level)
      return ordered.SplitPermutation(perm, shape, name=f'split{level}_random')
    return random_split
  masks = load_masks(config.lcma_masks)
  if tuple(masks.image_shape) != tuple(config.image_shape):
    raise ValueError(f'{config.lcma_masks!r} was written for image_shape {masks.image_shape}, '
                     f'but the model has image_shape {tuple(config.image_shape)}.')
  perms = masks.permutations[split]

  def stored_split(level, shape):
    if level >= masks.num_splits:
      raise ValueError(f'{config.lcma_masks!r} holds permutations for {masks.num_splits} '
                       f'splits, but the model has a split at level {level}: analyse a '
                       'no-split model with as many scales.')
    if tuple(shape) != tuple(masks.level_shapes[level]):
      raise ValueError(f'{config.lcma_masks!r}: level {level} has shape '
                       f'{masks.level_shapes[level]} in the file but {tuple(shape)} in the '
                       'model.')
    return ordered.SplitPermutation(perms[level], shape, name=f'split{level}_{split}')
  return stored_split


def encode_masks_file(path):
  """The bytes of the masks file at ``path`` (checked by ``load_masks``) as base64 text, for
  a JSON model config (``FlowModel.get_config``)."""
  load_masks(path)
  with open(path, 'rb') as f:
    return base64.b64encode(f.read()).decode('ascii')


def stored_masks_path(encoded, directory=None):
  """Writes the masks file that ``encode_masks_file`` encoded and returns its path.

  The file is named by its content's SHA-256 in ``directory`` (default: tfflows_lcma_masks in
  the system's temporary directory), so loading the same model twice writes it once; it is
  checked by ``load_masks``. Raises ValueError for text that is not such a file."""
  try:
    content = base64.b64decode(encoded.encode('ascii'), validate=True)
  except (ValueError, UnicodeEncodeError) as e:
    raise ValueError(f'the stored LCMA masks are not base64 text: {e}') from e
  directory = directory or os.path.join(tempfile.gettempdir(), 'tfflows_lcma_masks')
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, hashlib.sha256(content).hexdigest() + '.npz')
  if not os.path.isfile(path):
    atomic.write_bytes(path, content)
  load_masks(path)
  return path


def lcma_config(config, masks_path, split='lcma'):
  """The phase-2 config from the phase-1 (no-split) one: same architecture, the given split."""
  if split not in ('static',) + MODES:
    raise ValueError(f'split must be static, random, lcma or lcma_reverse, got {split!r}.')
  return config.replace(split=split, lcma_masks=os.fspath(masks_path))


def bundle_masks(config, directory, name=MASKS_NAME):
  """Copies config.lcma_masks into ``directory`` and returns the config pointing at the copy
  (an absolute path), e.g. next to an export. Configs without a masks file come back as is."""
  if not config.lcma_masks:
    return config
  load_masks(config.lcma_masks)  # check before copying
  os.makedirs(directory, exist_ok=True)
  target = os.path.abspath(os.path.join(directory, name))
  if os.path.abspath(config.lcma_masks) != target:
    shutil.copyfile(config.lcma_masks, target)
  return config.replace(lcma_masks=target)
