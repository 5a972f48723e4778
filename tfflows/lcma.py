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
same split shapes, Glow included (docs/lcma.md).

The choice of halves and the masks file (``write_masks`` / ``load_masks``) are described in
``tfflows.split_permutations``, the building block the model builders use; this module
re-exports them as the LCMA workflow's API.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

import bijectors as fb
from bijectors import permute
from bijectors import repeated
from tfflows.config import FlowConfig
from tfflows.models import build_model
# The masks file and the split permutations (a building block below the models), re-exported
# as the LCMA workflow's API.
from tfflows.split_permutations import (  # pylint: disable=unused-import
    FORMAT, MASKS_NAME, MODES, RANDOM_SPLIT_SEED, LcmaMasks, bundle_masks, factored_origins,
    lcma_config, level_permutations, level_shapes, load_masks, random_permutation,
    split_permutation_fn, write_masks)

__all__ = [
    # the analysis
    'Contributions', 'analyze', 'describe', 'forward_and_elementwise_log_det', 'origin_ids',
    'run_lcma_analyze', 'unsplit_segments',
    # re-exported from tfflows.split_permutations
    'FORMAT', 'MASKS_NAME', 'MODES', 'RANDOM_SPLIT_SEED', 'LcmaMasks', 'bundle_masks',
    'factored_origins', 'lcma_config', 'level_permutations', 'level_shapes', 'load_masks',
    'random_permutation', 'split_permutation_fn', 'write_masks',
]

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
  if isinstance(bijector, repeated.Repeated):   # the steps in order, as one loop
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
