"""LCMA: likelihood-contribution-based multi-scale architecture (Das, Abbeel & Spanos).

The two-phase workflow:

1. Pre-train RealNVP with no factoring out (``FlowConfig(model='realnvp', split='none')``).
2. ``analyze(model, image_batches)``: at every would-be split s, the log-det accumulated so far
   for every dimension, averaged over the data (``Contributions``).
   ``write_masks(path, contributions)`` turns it into one fixed permutation per level and
   stores them (``run_lcma_analyze`` does both from a config and a checkpoint).
3. Train ``FlowConfig(model='realnvp', split='lcma', lcma_masks=path)`` (or ``lcma_reverse``,
   ``random``, ``static``: the arms of the paper's ablation). The builders call
   ``split_permutation_fn(config)`` and insert the level's permutation right before its split.

Per-dimension log-det. Every bijector of the pre-training flow is either elementwise or a
permutation of positions, so every dimension keeps its identity through the flow:

* couplings (affine, elementwise scale): the Jacobian is triangular; dimension i of the
  transformed part gets log|dy_i/dx_i| = log_scale_i, the conditioning part gets 0
  (``AffineCoupling.forward_and_elementwise_log_det``);
* preprocessing: ``ToUnitInterval`` gives -ln 256 to every dimension (a constant: it does not
  change any ranking), the logit gives log(1 - 2a) - log p_i - log(1 - p_i), which depends on
  the pixel (large for saturated pixels). Both are included, as in the log-likelihood;
* squeezes and fixed permutations move dimensions without changing them: the map is carried
  through the same rearrangement (``forward_and_elementwise_log_det`` applies the bijector to
  the map itself) and gains nothing (log-det 0).

So the per-dimension maps sum, over the dimensions, to the flow's log-det, at every point of
the flow. Dimensions are named by their *origin*: the flat index h*W*C + w*C + c of the image
dimension they started from (a coupling transforms dimension i in place, a squeeze moves it).
``Contributions.by_origin[s, o]`` is the mean log-det accumulated by origin o up to split s.

Mixing bijectors (Glow's 1x1 convolutions, any dense mixing) have no per-dimension log-det: the
walk refuses them, so the analysis runs on RealNVP only. The permutations it writes apply to
any multi-scale flow whose levels are [squeeze, dimension-preserving layers, split] with the
same split shapes, Glow included (``tfflows/LCMA_README_SECTION.md``).

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

import dataclasses
import io
import json
import os
import shutil

import numpy as np
import tensorflow as tf

import bijectors as fb
from bijectors import ordered
from bijectors import permute
from bijectors import repeated
from tfflows import atomic
from tfflows.config import FlowConfig

FORMAT = 'tfflows-lcma-masks/1'
MODES = ('lcma', 'lcma_reverse', 'random')
RANDOM_SPLIT_SEED = 0  # seed of the fixed random split permutations (stored in the file too)
MASKS_NAME = 'lcma_masks.npz'

_PERMUTATIONS = (fb.Squeeze, permute.FlatPermutation, permute.ChannelPermutation,
                 permute.ReverseChannels, permute.SwapHalves)


# --------------------------------------------------------------------- per-dimension log-det


def forward_and_elementwise_log_det(bijector, x, elementwise=None, **condition):
  """Runs ``bijector`` forward on x carrying a per-dimension log-det map.

  Returns (y, e): y = bijector.forward(x) and e, of y's shape, the per-dimension log-det
  accumulated so far: ``elementwise`` (x's shape; zeros if None) carried through the
  bijector's rearrangements plus its own elementwise log-dets. sum over the event of e equals
  sum(elementwise) + bijector's forward log-det.

  Supported: ``Chain``s and ``Repeated`` steps of bijectors with a
  ``forward_and_elementwise_log_det`` method
  (AffineCoupling, Logit, ToUnitInterval) and of fixed permutations (Squeeze, FlatPermutation
  and its subclasses, ChannelPermutation, ReverseChannels, SwapHalves). Anything else raises
  ValueError: a bijector that mixes dimensions (a 1x1 convolution) has no per-dimension log-det.
  """
  if elementwise is None:
    elementwise = tf.zeros_like(x)
  if isinstance(bijector, repeated.Repeated):   # the steps in order, as a loop or unrolled
    def step(b, carry, kwargs):
      return forward_and_elementwise_log_det(b, *carry, **kwargs, **condition)
    return bijector.scan(step, (x, elementwise))
  if isinstance(bijector, fb.Chain):
    for b in bijector.bijectors:
      x, elementwise = forward_and_elementwise_log_det(b, x, elementwise, **condition)
    return x, elementwise
  if isinstance(bijector, _PERMUTATIONS):
    y, _ = bijector.forward_and_log_det(x)
    moved, _ = bijector.forward_and_log_det(elementwise)
    return y, moved
  if hasattr(bijector, 'forward_and_elementwise_log_det'):
    y, e = bijector.forward_and_elementwise_log_det(x, **condition)
    return y, elementwise + e
  raise ValueError(
      f'{bijector.name} ({type(bijector).__name__}) has no per-dimension log-det: LCMA '
      'contributions are defined through elementwise bijectors (couplings with elementwise '
      'scales, the logit) and permutations only. Bijectors that mix dimensions, such as '
      "Glow's invertible 1x1 convolutions, make them undefined; run the analysis on a RealNVP "
      "pre-trained with split='none'.")


def origin_ids(bijector, event_shape):
  """Where every position of bijector's output came from: an int array of the output event
  shape holding flat indices of the input dimensions (only permutations move positions)."""
  h, w, c = event_shape
  ids = tf.constant(np.arange(h * w * c, dtype=np.float64).reshape(1, h, w, c))
  return _carry_ids(bijector, ids)


def _carry_ids(bijector, ids):
  if isinstance(bijector, repeated.Repeated):
    return bijector.scan(lambda b, carry, kwargs: _carry_ids(b, carry), ids)
  if isinstance(bijector, fb.Chain):
    for b in bijector.bijectors:
      ids = _carry_ids(b, ids)
    return ids
  if isinstance(bijector, _PERMUTATIONS):
    return bijector.forward_and_log_det(ids)[0]
  return ids


# ------------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class Contributions:
  """Mean per-dimension log-det of a no-split flow, indexed by origin dimension.

  by_origin: [num_splits, H*W*C] at each would-be split (after the channel couplings of scale
  s); final: [H*W*C] at the end of the flow (sums to the mean total log-det);
  split_maps: the maps at each split in the no-split flow's own layout;
  num_examples: how many images were averaged.
  """

  image_shape: tuple
  by_origin: np.ndarray
  final: np.ndarray
  split_maps: list
  num_examples: int

  @property
  def num_splits(self):
    return int(self.by_origin.shape[0])


def unsplit_segments(model):
  """The segments of a no-split RealNVP: one Chain per scale; a split would follow each
  segment but the last. Raises ValueError for any other model."""
  config = model.config
  if config.model != 'realnvp' or config.split != 'none':
    hint = (" Glow's 1x1 convolutions mix dimensions, so its per-dimension log-det is "
            'undefined; the permutations of a RealNVP analysis with the same split shapes can '
            "be used on Glow (split='lcma')." if config.model == 'glow' else '')
    raise ValueError('The LCMA analysis needs a RealNVP pre-trained with no factoring out '
                     f"(model='realnvp', split='none'); got model={config.model!r}, "
                     f'split={config.split!r}.{hint}')
  levels = model.flow.levels
  if len(levels) != 1 or not isinstance(levels[0].transform, fb.Chain):
    raise ValueError('A no-split RealNVP has a single level made of one Chain per scale.')
  segments = list(levels[0].transform.bijectors)
  if len(segments) < 2:
    raise ValueError(f'num_scales={config.num_scales} has no split to choose: LCMA needs '
                     'num_scales >= 2.')
  return segments


def analyze(model, image_batches, max_examples=None, seed=0, use_tf_function=True):
  """Mean per-dimension accumulated log-det at every would-be split of a no-split RealNVP.

  model: a ``FlowModel`` built from ``FlowConfig(model='realnvp', split='none', ...)`` with
  trained weights. image_batches: an iterable (or tf.data.Dataset) of uint8 image batches
  [B, H, W, C] (or (images, labels) tuples); it is read once, up to ``max_examples`` images
  (all if None; a repeating dataset needs max_examples). Each image is dequantized with
  uniform noise from a stateless seed derived from ``seed`` and the batch number, so the
  result is deterministic. Batch norm runs in inference mode (its moving averages).
  use_tf_function: trace the per-batch computation once (False: run eagerly, quicker for a
  handful of tiny batches). Returns ``Contributions``.
  """
  segments = unsplit_segments(model)
  shape = tuple(model.config.image_shape)
  ids = []
  for k in range(len(segments) - 1):
    chain = fb.Chain(segments[:k + 1], name='lcma_prefix')
    ids.append(origin_ids(chain, shape).numpy()[0].astype(np.int64))
  final_ids = origin_ids(model.flow.levels[0].transform, shape).numpy()[0].astype(np.int64)

  def batch_sums(images, batch_seed):
    values, _ = model.dequantizer(images, seed=batch_seed)
    x, e, sums = values, None, []
    for segment in segments:
      x, e = forward_and_elementwise_log_det(segment, x, e)
      sums.append(tf.reduce_sum(tf.cast(e, tf.float64), axis=0))
    return sums

  if use_tf_function:
    batch_sums = tf.function(batch_sums)
  totals, count = None, 0
  for b, batch in enumerate(image_batches):
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    images = model.check_images(images)
    if max_examples is not None:
      remaining = int(max_examples) - count
      if remaining <= 0:
        break
      images = images[:remaining]
    sums = batch_sums(images, tf.constant([int(seed), b], tf.int32))
    sums = [s.numpy() for s in sums]
    totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
    count += int(images.shape[0])
    if max_examples is not None and count >= max_examples:
      break
  if not count:
    raise ValueError('analyze got no images: image_batches is empty.')
  means = [t / count for t in totals]
  d = int(np.prod(shape))
  by_origin = np.zeros((len(segments) - 1, d))
  for k, (m, i) in enumerate(zip(means[:-1], ids)):
    by_origin[k, i.ravel()] = m.ravel()
  final = np.zeros(d)
  final[final_ids.ravel()] = means[-1].ravel()
  return Contributions(shape, by_origin, final, means[:-1], count)


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
  """Writes the masks file for ``contributions`` (a ``Contributions`` or an array
  [num_splits, H*W*C] with ``image_shape``). Atomic: a temporary file renamed into place.
  Returns the path."""
  if isinstance(contributions, Contributions):
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


# ----------------------------------------------------------------------- the analyze mode


def run_lcma_analyze(config, checkpoint_restore_fn, dataset, output_path, max_examples=None,
                     seed=0, source=None, use_tf_function=True):
  """Phase 2 of the workflow: builds the no-split model of ``config``, restores its weights,
  analyses ``dataset`` and writes the masks file. Returns (output_path, Contributions).

  config: the pre-training FlowConfig (or dict) with model='realnvp', split='none'.
  checkpoint_restore_fn: callable(model) that loads the pre-trained weights into the built
  model, or a path for ``model.load_weights`` (a ``.weights.h5`` file).
  dataset: uint8 image batches (see ``analyze``); use the training split, unaugmented.
  source: recorded in the file's metadata (e.g. the --init_from workdir).
  """
  from tfflows.models import build_model  # pylint: disable=import-outside-toplevel
  if isinstance(config, dict):
    config = FlowConfig.from_dict(config)
  model = build_model(config)
  unsplit_segments(model)  # a clear error before restoring anything
  if isinstance(checkpoint_restore_fn, (str, os.PathLike)):
    model.load_weights(os.fspath(checkpoint_restore_fn))
  elif checkpoint_restore_fn is not None:
    checkpoint_restore_fn(model)
  contributions = analyze(model, dataset, max_examples=max_examples, seed=seed,
                          use_tf_function=use_tf_function)
  metadata = {'source': None if source is None else os.fspath(source),
              'pretrain_config': config.to_dict()}
  write_masks(output_path, contributions, metadata=metadata)
  return output_path, contributions


def describe(contributions, perms_by_mode=None):
  """A few lines for logs: per split, the mean contribution of the kept and factored halves
  for each mode."""
  perms_by_mode = perms_by_mode or {
      m: level_permutations(contributions.by_origin, contributions.image_shape, m)
      for m in ('static',) + MODES}
  lines = [f'LCMA analysis of {contributions.num_examples} images, image shape '
           f'{contributions.image_shape}; mean total log-det {contributions.final.sum():.1f} '
           'nats']
  for mode, perms in perms_by_mode.items():
    parts = factored_origins(perms, contributions.image_shape)
    for s, out in enumerate(parts[:-1]):
      kept = np.setdiff1d(np.concatenate(parts[s:]), out)
      c = contributions.by_origin[s]
      lines.append(f'  {mode:12s} split {s}: mean log-det kept {c[kept].mean():+.4f}, '
                   f'factored {c[out].mean():+.4f}')
  return '\n'.join(lines)
