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
from tfflows import atomic
from tfflows.models.flow_model import refuse_non_finite

from tfflows.data import pipeline
from train import checkpoint_contents
from train import checkpoint_files
from train import progress as progress_lib
from train import trainer
from train.run import UserError, say


# ---------------------------------------------------------------------------- result files
RESULT_FILES = {
    'eval': 'eval/ckpt-{step}_k{k}{images}{seed}.json',
    'samples': 'samples/step{step}_t{temperature:g}{seed}.png',
    'interpolation': 'samples/step{step}_interpolation_{name}.png',
    'memorization': 'samples/step{step}_memorization_t{temperature:g}{seed}.png',
    'memorization_json': 'samples/step{step}_memorization_t{temperature:g}{seed}.json',
    'ood': 'ood/ckpt-{step}_k{k}{seed}.json',
}


def result_path(workdir, kind, step, *, k=None, num_images=None, temperature=None, seed=0,
                name=None):
  """Where a mode writes the result of `kind` for the checkpoint of `step`.

  One name per checkpoint and setting, so a resumed run, a later checkpoint or an eval with
  another k adds a file beside the earlier ones instead of replacing them:

      eval            eval/ckpt-<step>_k<k>[_n<images>][_seed<seed>].json
      samples         samples/step<step>_t<temperature>[_seed<seed>].png
      interpolation   samples/step<step>_interpolation_<name>.png
      memorization    samples/step<step>_memorization_t<temperature>[_seed<seed>].png, .json
      ood             ood/ckpt-<step>_k<k>[_seed<seed>].json

  `_n<images>` appears when the eval covers part of the test split (num_images given),
  `_seed<seed>` when the seed is not 0. Exports go to EXPORT_DIR/<step> (TF Serving's version
  directories). Raises ValueError for an unknown kind.
  """
  if kind not in RESULT_FILES:
    raise ValueError(f'unknown result kind {kind!r}; known: {", ".join(RESULT_FILES)}')
  relative = RESULT_FILES[kind].format(
      step=int(step), k=k, temperature=temperature, name=name,
      images=f'_n{num_images}' if num_images else '', seed=f'_seed{seed}' if seed else '')
  return os.path.join(workdir, relative)


def progress(run, title, total, unit='images'):
  """A Progress display that follows --verbose (1: bar on a terminal, 2: lines, 0: none)."""
  verbose = run.flags.verbose
  return progress_lib.Progress(title, total, unit, show=verbose > 0,
                               bar=None if verbose == 1 else False)


# ------------------------------------------------------------------------------------- eval
def num_eval_images(run):
  """Test images an eval covers: --eval_batches batches of the eval batch size, or all."""
  num_test = pipeline.num_examples(run.flags.dataset, 'test')
  if run.flags.eval_batches:
    return min(num_test, run.flags.eval_batches * run.eval_batch_size)
  return num_test


def run_eval(run):
  """Test bits/dim: the one-sample bound and the k-sample importance-weighted estimate over
  --eval_batches batches (all if 0), written to WORKDIR/eval/ckpt-<step>_k<k>.json
  (``result_path``), with a progress display (images done, running figures, ETA).

  Each image's noise comes from --seed folded with its pixels, so an eval is reproducible and
  an image's numbers do not depend on --eval_batch_size; the IW estimate log (1/k) sum_j w_j
  is >= the bound's expectation E[log w] for every k. Cost: (1 + k) forward passes an image.
  A NaN or Inf number stops the eval (NonFiniteError) at the batch that gives it, and nothing
  is written. Under --strategy=multiworker worker w of W computes batches w, w + W, ... and
  the chief gathers them (train/distributed.py), which gives the single-worker figures."""
  f = run.flags
  model, prefix = run.load_model()
  k = f.num_importance_samples
  started = time.perf_counter()
  worker, workers = run.eval_shard
  per_batch, sizes = {}, []  # {batch index: [size, 2] bound and IW bits/dim}
  with progress(run, f'eval (bound and IW k={k})', num_eval_images(run)) as shown:
    for i, batch in enumerate(run.test_dataset(drop_remainder=False)):
      sizes.append(len(batch))
      if i % workers == worker:
        per_batch[i] = np.stack(
            [_finite(model.bits_per_dim(batch, 1, seed=f.seed).numpy(), prefix, i),
             _finite(model.bits_per_dim(batch, k, seed=f.seed).numpy(), prefix, i)], axis=1)
        running = np.concatenate(list(per_batch.values())).mean(axis=0)
        shown.update(len(batch), bound=f'{running[0]:.4f}', iw=f'{running[1]:.4f}')
      else:
        shown.update(len(batch))  # another worker's batch
  bound, iw = run.gather_batches(per_batch, sizes, width=2).T
  step = checkpoint_files.step_of(prefix)
  results = {
      'checkpoint': prefix, 'step': step, 'dataset': f.dataset,
      'split': 'test', 'num_images': int(bound.size), 'num_importance_samples': k,
      'seed': f.seed,
      'bits_per_dim_bound': float(bound.mean()), 'bits_per_dim_iw': float(iw.mean()),
      'bits_per_dim_bound_stderr': float(bound.std() / math.sqrt(bound.size)),
      'bits_per_dim_iw_stderr': float(iw.std() / math.sqrt(iw.size)),
      'seconds': round(time.perf_counter() - started, 1)}
  path = result_path(run.workdir, 'eval', step, k=k, seed=f.seed,
                     num_images=bound.size if f.eval_batches else None)
  if run.is_chief:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_json(path, results)
  say('eval (%s, step %d, %d %s test images, %.0f s): bound %.4f bits/dim, importance-weighted '
      '(k=%d) %.4f bits/dim -> %s', os.path.basename(prefix), step, results['num_images'],
      f.dataset, results['seconds'], results['bits_per_dim_bound'], k,
      results['bits_per_dim_iw'], path)
  return results


def _finite(bits_per_dim, prefix, batch):
  return refuse_non_finite(bits_per_dim, f'eval: bits/dim of test batch {batch} under the model '
                           f'of {prefix}', 'nothing is written')


# ---------------------------------------------------------------------------------- samples
def run_sample(run):
  """One PNG grid of --num_samples samples per temperature, seeded by --seed:
  WORKDIR/samples/step<step>_t<T>.png (``result_path``)."""
  from tfflows import sampling  # pylint: disable=import-outside-toplevel
  f = run.flags
  model, prefix = run.load_model()
  step = checkpoint_files.step_of(prefix)
  paths = []
  with progress(run, 'samples', f.num_samples * len(run.temperatures)) as shown:
    for t in run.temperatures:
      images = model.sample(f.num_samples, temperature=t, seed=f.seed).numpy()
      path = result_path(run.workdir, 'samples', step, temperature=t, seed=f.seed)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      sampling.save_image_grid(images, path)
      paths.append(path)
      shown.update(len(images), temperature=f'{t:g}')
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
  WORKDIR/samples/step<step>_interpolation_<name>.png, one path a row."""
  from tfflows import sampling  # pylint: disable=import-outside-toplevel
  f = run.flags
  if f.interpolation not in INTERPOLATIONS:
    raise UserError(f'--interpolation={f.interpolation} is not one of '
                     f'{", ".join(INTERPOLATIONS)}')
  model, prefix = run.load_model()
  pairs = f.interpolation_pairs
  images = run.images('test', 2 * pairs)
  if len(images) < 2 * pairs:
    raise UserError(f'--interpolation_pairs={pairs} needs {2 * pairs} test images; the test '
                     f'split has {len(images)}.')
  paths = np.asarray(INTERPOLATIONS[f.interpolation](model, images[:pairs], images[pairs:],
                                                     f.interpolation_steps))
  path = result_path(run.workdir, 'interpolation', checkpoint_files.step_of(prefix),
                     name=f.interpolation)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sampling.save_image_grid(paths, path)  # [pairs, steps, H, W, C]: one path a row
  say('%s interpolation, %d pairs x %d steps -> %s', f.interpolation, pairs,
      f.interpolation_steps, path)
  return path


def run_memorization(run):
  """DenseFlow appendix E: for --memorization_queries samples (first temperature), the
  --memorization_neighbours training images nearest in L2 over the central
  --memorization_crop square: WORKDIR/samples/step<step>_memorization_t<T>.png, a row a sample
  (the sample, then its neighbours, nearest first), and the distances in the .json beside it."""
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
  step = checkpoint_files.step_of(prefix)
  t = run.temperatures[0]
  path = result_path(run.workdir, 'memorization', step, temperature=t, seed=f.seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  sampling.save_image_grid(rows, path)
  atomic.write_json(result_path(run.workdir, 'memorization_json', step, temperature=t,
                                seed=f.seed), {
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
  export_dir = os.path.join(base, str(checkpoint_files.step_of(prefix)))
  with progress(run, 'export', 4, 'stages') as shown:
    images = run.images('test', 8)
    export.check_finite_log_prob(model, images, f.export_importance_samples)
    typicality = typicality_statistics(run, model, f.export_importance_samples)
    shown.update(1, stage='typicality statistics')
    export.export_saved_model(model, export_dir,
                              num_importance_samples=f.export_importance_samples,
                              overwrite=True, check_images=images, typicality=typicality)
    shown.update(1, stage='SavedModel written')
    loaded, _ = export.load_exported(export_dir)
    shown.update(1, stage='reloaded')
    served = export.serve_log_prob(loaded, images)['bits_per_dim']
    python = model.bits_per_dim(images, f.export_importance_samples,
                                seed=export.SERVING_SEED).numpy()
    difference = float(np.max(np.abs(served - python)))
    shown.update(1, stage='checked on 8 test images')
  say('exported %s -> %s (served bits/dim of 8 test images: mean %.4f, max difference to '
      'the Python model %.3g)', os.path.basename(prefix), export_dir, float(served.mean()),
      difference)
  if difference:
    logging.warning('the exported model differs from the Python model by %g bits/dim',
                    difference)
  return export_dir


# ----------------------------------------------------------------------- out-of-distribution
def heldout_split(test_images):
  """(held-out, evaluation): the first and second half of the test split. The held-out half
  sets the typicality threshold (the embedded digits have no validation split, and every
  training image was trained on); --mode=ood measures the typicality test on the other half
  only. The per-image scores have no parameter and are measured on the whole test split."""
  half = len(test_images) // 2
  return test_images[:half], test_images[half:]


def _bits_per_dim(model, batches, k, limit=None):
  """Served bits/dim (k, noise seed 0) of a stream of uint8 batches, up to limit images
  (NaN or Inf ones are refused by tfflows.ood.typicality_statistics)."""
  from tfflows import ood  # pylint: disable=import-outside-toplevel
  values, seen = [], 0
  for batch in batches:
    batch = batch[:limit - seen] if limit else batch
    values.append(model.bits_per_dim(batch, k, seed=ood.SERVING_SEED).numpy())
    seen += len(batch)
    if limit and seen >= limit:
      break
  return np.concatenate(values) if values else np.zeros([0], np.float32)


def typicality_statistics(run, model, k, heldout_bits=None):
  """tfflows.ood.TypicalityStatistics of the model's served bits/dim (k): H_hat over the first
  --typicality_train_images training images, epsilon from --typicality_bootstrap batches of
  --typicality_batch_size images of the held-out half of the test split (heldout_split)."""
  from tfflows import ood  # pylint: disable=import-outside-toplevel
  f = run.flags
  train_bits = _bits_per_dim(model, run.image_batches('train', run.eval_batch_size), k,
                             limit=f.typicality_train_images)
  if heldout_bits is None:
    heldout, _ = heldout_split(run.all_images('test'))
    heldout_bits = _bits_per_dim(model, [heldout[i:i + run.eval_batch_size]
                                         for i in range(0, len(heldout), run.eval_batch_size)], k)
  try:
    return ood.typicality_statistics(train_bits, heldout_bits, f.typicality_batch_size,
                                     f.typicality_alpha, f.typicality_bootstrap, seed=f.seed,
                                     num_importance_samples=k)
  except ValueError as error:
    raise UserError(f'--typicality_batch_size={f.typicality_batch_size}: {error}') from None


def _batch_means(bits, batch_size, num_batches, rng):
  """Means of num_batches batches of batch_size values, each drawn without replacement."""
  return np.array([bits[rng.choice(len(bits), batch_size, replace=False)].mean()
                   for _ in range(num_batches)])


def run_ood(run):
  """Out-of-distribution detection on the test split against the sets of
  tfflows.data.ood_sets: AUROC of the served bits/dim, of the PNG complexity and of the
  complexity-corrected score per set, and the typicality test's rates, written to
  WORKDIR/ood/ckpt-<step>_k<k>.json (``result_path``). k is --export_importance_samples and the
  noise seed 0: the numbers the export serves."""
  from tfflows import ood  # pylint: disable=import-outside-toplevel
  from tfflows.data import ood_sets  # pylint: disable=import-outside-toplevel
  f = run.flags
  model, prefix = run.load_model()
  k = f.export_importance_samples
  started = time.perf_counter()
  test = run.all_images('test')
  sets = ood_sets.ood_sets(test, seed=f.seed)
  total = len(test) + sum(len(v) for v in sets.values())
  scored = {}
  with progress(run, f'ood scores (k={k})', total) as shown:
    for name, images in [('test', test)] + list(sets.items()):
      parts = []
      for i in range(0, len(images), run.eval_batch_size):
        parts.append(ood.scores(model, images[i:i + run.eval_batch_size], k))
        shown.update(len(parts[-1]['score']), set=name)
      scored[name] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
  heldout, _ = heldout_split(test)
  inside = scored['test']
  stats = typicality_statistics(run, model, k, heldout_bits=inside['bits_per_dim'][:len(heldout)])
  evaluation_bits = inside['bits_per_dim'][len(heldout):]
  m, batches = stats.batch_size, f.typicality_bootstrap
  if len(evaluation_bits) < m:
    raise UserError(f'--typicality_batch_size={m}: the evaluation half of the test split has '
                    f'{len(evaluation_bits)} images.')
  rng = np.random.default_rng(f.seed + 1)
  in_distances = np.abs(_batch_means(evaluation_bits, m, batches, rng) - stats.train_bits_per_dim)
  results = {
      'checkpoint': prefix, 'step': checkpoint_files.step_of(prefix), 'dataset': f.dataset,
      'num_importance_samples': k, 'seed': f.seed, 'score_sign': 'larger: more out-of-distribution',
      'typicality': json.loads(stats.to_json()),
      'in_distribution': {
          'num_images': len(test), **_means(inside),
          'typicality_evaluation_images': len(evaluation_bits),
          'typicality_false_positive_rate': float(np.mean(in_distances > stats.epsilon))},
      'sets': {}}
  for name, images in sets.items():
    values = scored[name]
    out_distances = np.abs(_batch_means(values['bits_per_dim'], min(m, len(images)), batches, rng)
                           - stats.train_bits_per_dim)
    results['sets'][name] = {
        'num_images': len(images), **_means(values),
        'auroc_bits_per_dim': ood.auroc(inside['bits_per_dim'], values['bits_per_dim']),
        'auroc_complexity': ood.auroc(inside['complexity_bits_per_dim'],
                                      values['complexity_bits_per_dim']),
        'auroc_score': ood.auroc(inside['score'], values['score']),
        'typicality_detection_rate': float(np.mean(out_distances > stats.epsilon)),
        'typicality_auroc': ood.auroc(in_distances, out_distances)}
  results['seconds'] = round(time.perf_counter() - started, 1)
  path = result_path(run.workdir, 'ood', results['step'], k=k, seed=f.seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic.write_json(path, results)
  say('ood (%s, k=%d, %d test images; AUROC, 1 = perfect): %s -> %s',
      os.path.basename(prefix), k, len(test), '; '.join(
          f'{name} bits/dim {r["auroc_bits_per_dim"]:.3f}, score {r["auroc_score"]:.3f}, '
          f'typicality M={m} {r["typicality_auroc"]:.3f}'
          for name, r in results['sets'].items()), path)
  return results


def _means(values):
  return {f'mean_{key}': float(np.mean(v)) for key, v in values.items()}


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
  prefix = checkpoint_files.find_checkpoint(f.init_from)
  output = os.path.abspath(f.lcma_masks or run.path(lcma.MASKS_NAME))
  path, contributions = lcma.run_lcma_analyze(
      pre_config, lambda model: checkpoint_contents.restore_model(model, prefix),
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
    'ood': run_ood,
    'lcma_analyze': run_lcma_analyze,
}
# Modes that need no checkpoint in --workdir (they write one, or read --init_from's).
TRAINING_MODES = ('train', 'lcma_analyze')
