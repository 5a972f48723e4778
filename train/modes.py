"""What ``--mode`` runs: one function of a Run per mode, in ``MODES``.

Adding a mode is one function and one dict entry: ``MODES['name'] = fn`` with ``fn(run)``;
it is then a valid ``--mode`` value. Every mode except those in ``TRAINING_MODES`` reads a
trained checkpoint (``run.load_model()``), and the program refuses to start it on a workdir
with none. Interpolations work the same way: ``INTERPOLATIONS['name'] = fn`` with
``fn(model, images_a, images_b, steps) -> uint8 [pairs, steps, H, W, C]``.
"""

import json
import math
import os
import time

import numpy as np
from absl import logging

import tfflows
from tfflows.models.flow_model import NonFiniteError

from train import checkpoints
from train import trainer
from train.run import UserError, say


# ------------------------------------------------------------------------------------- eval
def run_eval(run):
  """Test bits/dim: the one-sample bound and the k-sample importance-weighted estimate over
  --eval_batches batches (all if 0), written to WORKDIR/eval.json.

  Each image's noise comes from --seed folded with its pixels, so an eval is reproducible and
  an image's numbers do not depend on --eval_batch_size; the IW estimate log (1/k) sum_j w_j
  is >= the bound's expectation E[log w] for every k. A NaN or Inf number stops the eval
  (NonFiniteError) at the batch that gives it, and nothing is written. Under
  --strategy=multiworker worker w of W computes batches w, w + W, ... and the chief gathers
  them (train/distributed.py), which gives the single-worker figures."""
  f = run.flags
  model, prefix = run.load_model()
  k = f.num_importance_samples
  started = time.perf_counter()
  worker, workers = run.eval_shard
  per_batch, sizes = {}, []  # {batch index: [size, 2] bound and IW bits/dim}
  for i, batch in enumerate(run.test_dataset(drop_remainder=False)):
    sizes.append(len(batch))
    if i % workers == worker:
      per_batch[i] = np.stack([_finite(model.bits_per_dim(batch, 1, seed=f.seed).numpy(), prefix, i),
                               _finite(model.bits_per_dim(batch, k, seed=f.seed).numpy(), prefix, i)],
                              axis=1)
  bound, iw = run.gather_batches(per_batch, sizes, width=2).T
  results = {
      'checkpoint': prefix, 'step': checkpoints.step_of(prefix), 'dataset': f.dataset,
      'split': 'test', 'num_images': int(bound.size), 'num_importance_samples': k,
      'bits_per_dim_bound': float(bound.mean()), 'bits_per_dim_iw': float(iw.mean()),
      'bits_per_dim_bound_stderr': float(bound.std() / math.sqrt(bound.size)),
      'bits_per_dim_iw_stderr': float(iw.std() / math.sqrt(iw.size)),
      'seconds': round(time.perf_counter() - started, 1)}
  if run.is_chief:
    checkpoints.write_json(run.path('eval.json'), results)
  say('eval (%s, step %d, %d %s test images): bound %.4f bits/dim, importance-weighted '
      '(k=%d) %.4f bits/dim -> %s', os.path.basename(prefix), results['step'],
      results['num_images'], f.dataset, results['bits_per_dim_bound'], k,
      results['bits_per_dim_iw'], run.path('eval.json'))
  return results


def _finite(bits_per_dim, prefix, batch):
  bad = ~np.isfinite(bits_per_dim)
  if bad.any():
    raise NonFiniteError(f'eval: the model of {prefix} gives NaN or Inf bits/dim for '
                         f'{int(bad.sum())} of {bad.size} test images of batch {batch}; nothing '
                         'is written (a model that gives them is broken: check the checkpoint).')
  return bits_per_dim


# ---------------------------------------------------------------------------------- samples
def run_sample(run):
  """One PNG grid of --num_samples samples per temperature, seeded by --seed:
  WORKDIR/samples/temperature<T>_seed<S>.png."""
  from tfflows import sampling  # pylint: disable=import-outside-toplevel
  f = run.flags
  model, prefix = run.load_model()
  paths = []
  for t in run.temperatures:
    images = model.sample(f.num_samples, temperature=t, seed=f.seed).numpy()
    path = run.path('samples', f'temperature{t:g}_seed{f.seed}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sampling.save_image_grid(images, path)
    paths.append(path)
  say('samples of %s at temperatures %s -> %s', os.path.basename(prefix),
      ', '.join(f'{t:g}' for t in run.temperatures), ', '.join(paths))
  return paths


def _linear(model, images_a, images_b, steps):
  from tfflows import sampling  # pylint: disable=import-outside-toplevel
  return sampling.linear_interpolation(model, images_a, images_b, steps)


def _mar(model, images_a, images_b, steps):
  """mAR-SCF's high-density interpolation (tfflows.interpolation; Adamax lr 5e-2, 100
  iterations, lambda1 = lambda2 = 0.3). Needs a model with a prior over latents (any model)."""
  from tfflows import interpolation  # pylint: disable=import-outside-toplevel
  return interpolation.mar_interpolation(model, images_a, images_b, steps)


INTERPOLATIONS = {'linear': _linear, 'mar': _mar}


def run_interpolate(run):
  """Interpolation in latent space between the first 2 x --interpolation_pairs test images
  (pair i: image i and image pairs + i), --interpolation_steps images a path:
  WORKDIR/samples/interpolation_<name>.png, one path a row."""
  from tfflows import sampling  # pylint: disable=import-outside-toplevel
  f = run.flags
  if f.interpolation not in INTERPOLATIONS:
    raise UserError(f'--interpolation={f.interpolation} is not one of '
                     f'{", ".join(INTERPOLATIONS)}')
  model, _ = run.load_model()
  pairs = f.interpolation_pairs
  images = run.images('test', 2 * pairs)
  if len(images) < 2 * pairs:
    raise UserError(f'--interpolation_pairs={pairs} needs {2 * pairs} test images; the test '
                     f'split has {len(images)}.')
  paths = np.asarray(INTERPOLATIONS[f.interpolation](model, images[:pairs], images[pairs:],
                                                     f.interpolation_steps))
  path = run.path('samples', f'interpolation_{f.interpolation}.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sampling.save_image_grid(paths, path)  # [pairs, steps, H, W, C]: one path a row
  say('%s interpolation, %d pairs x %d steps -> %s', f.interpolation, pairs,
      f.interpolation_steps, path)
  return path


def run_memorization(run):
  """DenseFlow appendix E: for --memorization_queries samples (first temperature), the
  --memorization_neighbours training images nearest in L2 over the central
  --memorization_crop square: WORKDIR/samples/memorization.png, a row per sample (the sample,
  then its neighbours, nearest first), and the distances in WORKDIR/memorization.json."""
  from tfflows import sampling  # pylint: disable=import-outside-toplevel
  f = run.flags
  model, prefix = run.load_model()
  h, w, c = run.config.image_shape
  crop = min(f.memorization_crop, h, w)
  samples = model.sample(f.memorization_queries, temperature=run.temperatures[0],
                         seed=f.seed).numpy()
  # Up to 1 GB of training images are read into memory (exact re-ranking); more are streamed.
  in_memory = run.num_train * h * w * c <= 2 ** 30
  train_images = run.all_images('train') if in_memory else run.image_batches('train')
  indices, distances = sampling.nearest_training_images(samples, train_images, crop=crop,
                                                        k=f.memorization_neighbours)
  if not in_memory:
    train_images = _gather(run.image_batches('train'), indices)
    indices = np.searchsorted(np.unique(indices), indices)
  rows = sampling.memorization_grid(samples, train_images, indices)
  path = run.path('samples', 'memorization.png')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sampling.save_image_grid(rows, path)
  checkpoints.write_json(run.path('memorization.json'), {
      'checkpoint': prefix, 'temperature': run.temperatures[0], 'crop': crop,
      'nearest_l2': distances[:, 0].tolist(), 'distances': distances.tolist(),
      'train_indices': np.asarray(indices).tolist() if in_memory else None})
  say('memorization check: %d samples vs %d training images (central %dx%d crop), nearest '
      'L2 distance min %.1f / mean %.1f -> %s', len(samples), run.num_train, crop, crop,
      float(distances[:, 0].min()), float(distances[:, 0].mean()), path)
  return path


def _gather(batches, indices):
  """The images at the sorted unique `indices` of a stream of batches (one pass)."""
  wanted = np.unique(indices)
  found, seen = [], 0
  for batch in batches:
    batch = np.asarray(batch)
    local = wanted[(wanted >= seen) & (wanted < seen + len(batch))] - seen
    found.append(batch[local])
    seen += len(batch)
  return np.concatenate(found)


# ----------------------------------------------------------------------------------- export
def run_export(run):
  """SavedModel of the checkpoint at EXPORT_DIR/<step> (TF Serving's version layout), then a
  check that the reloaded signatures give the Python model's numbers on test images."""
  from tfflows import export  # pylint: disable=import-outside-toplevel
  f = run.flags
  model, prefix = run.load_model()
  base = f.export_dir or run.path('export')
  export_dir = os.path.join(base, str(checkpoints.step_of(prefix)))
  images = run.images('test', 8)
  export.export_saved_model(model, export_dir, num_importance_samples=f.export_importance_samples,
                            overwrite=True, check_images=images)
  loaded, _ = export.load_exported(export_dir)
  served = export.serve_log_prob(loaded, images)['bits_per_dim']
  python = model.bits_per_dim(images, f.export_importance_samples,
                              seed=export.SERVING_SEED).numpy()
  difference = float(np.max(np.abs(served - python)))
  say('exported %s -> %s (served bits/dim of 8 test images: mean %.4f, max difference to '
      'the Python model %.3g)', os.path.basename(prefix), export_dir, float(served.mean()),
      difference)
  if difference:
    logging.warning('the exported model differs from the Python model by %g bits/dim',
                    difference)
  return export_dir


# ------------------------------------------------------------------------------ LCMA analysis
def run_lcma_analyze(run):
  """LCMA phase 2: from the no-split RealNVP pre-trained in --init_from, the per-dimension
  log-det contributions over the training split, written as the masks file --lcma_masks
  (default WORKDIR/lcma_masks.npz) that phase 3 (split=lcma|lcma_reverse|random) builds from."""
  from tfflows import lcma  # pylint: disable=import-outside-toplevel
  f = run.flags
  if not f.init_from:
    raise UserError('--mode=lcma_analyze needs --init_from=WORKDIR of the model pre-trained '
                    'with --split=none.')
  with open(os.path.join(f.init_from, 'config.json')) as config_file:
    pre_config = tfflows.FlowConfig.from_dict(json.load(config_file))
  prefix = checkpoints.find_checkpoint(f.init_from)
  output = os.path.abspath(f.lcma_masks or run.path(lcma.MASKS_NAME))
  path, contributions = lcma.run_lcma_analyze(
      pre_config, lambda model: checkpoints.restore_model(model, prefix),
      run.image_batches('train', run.eval_batch_size), output, source=prefix)
  say(lcma.describe(contributions))
  say('LCMA masks written to %s', path)
  return path


MODES = {
    'train': trainer.run_train,
    'eval': run_eval,
    'sample': run_sample,
    'interpolate': run_interpolate,
    'export': run_export,
    'memorization': run_memorization,
    'lcma_analyze': run_lcma_analyze,
}
# Modes that need no checkpoint in --workdir (they write one, or read --init_from's).
TRAINING_MODES = ('train', 'lcma_analyze')
