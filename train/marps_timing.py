"""MARPS sampling time against the image size N (mAR-SCF seed, section C and Fig. 7).

MARPS draws the channels of every mAR prior one after another and inverts each level in
parallel, so with the number of levels growing with the resolution as in the paper (L = 3 at
32x32, L = 4 at 64x64: L = log2(N) - 2, a 4x4 top level) the number of sequential steps is

    (3 * 2^L - 2) * C = (3 N / 4 - 2) * C,

linear in N, whereas a pixel-wise autoregressive model needs N^2 C steps. This program builds
small mAR-SCF models (the paper's mAR prior: 3-layer ConvLSTM, hidden 32; a small flow) for
N = 8, 16, 32, 64, times sampling a batch after a warm-up, and prints one row per size:

    N  levels  sequential steps  pixel-AR steps  eager s  graph s (tf.function)

"eager" times ``model.sample_values`` run eagerly (Python dispatch of every op); "graph" times
the same computation traced once into a ``tf.function`` (what ``model.sample`` and the
SavedModel ``sample`` signature run).
Weights are random but non-trivial (ActNorm initialised on random images, zero-initialised
outputs perturbed), so the MixLogCDF root searches do real work. Times are the mean and standard
deviation over ``repeats`` runs; on a shared CPU expect noise.

    python -m train.marps_timing                 # C = 3, batch 8, MixLogCDF couplings
    python -m train.marps_timing --channels=1 --coupling=affine --repeats=3

From code: ``rows = run(sizes=(8, 16, 32, 64)); print(format_table(rows))``.
"""

import argparse
import math
import time

import numpy as np
import tensorflow as tf

from tfflows.config import FlowConfig
from tfflows.distributions.mar_prior import marps_num_steps
from tfflows.models import build_model
from tfflows.models.flow_model import to_images

SIZES = (8, 16, 32, 64)


def levels_for(size):
  """L = log2(N) - 2 (at least 1): the paper's 3 levels at 32x32 and 4 at 64x64."""
  if size < 4 or size & (size - 1):
    raise ValueError(f'image size N must be a power of two >= 4, got {size}.')
  return max(1, int(math.log2(size)) - 2)


def timing_config(size, channels=3, coupling='mixlogcdf', steps_per_level=2, width=32,
                  mar_hidden=32, mar_layers=3):
  """A small mAR-SCF for N x N x C images (paper-size prior, small flow)."""
  return FlowConfig(model='marscf', image_shape=(size, size, channels),
                    num_levels=levels_for(size), steps_per_level=steps_per_level, width=width,
                    coupling=coupling, mar_hidden=mar_hidden, mar_layers=mar_layers,
                    num_components=8, coupling_blocks=1, attention_heads=4, dropout=0.)


def randomize(model, seed=0, std=0.05):
  """Initialises ActNorm on random images and perturbs every all-zero trainable weight."""
  rng = np.random.RandomState(seed)
  images = rng.randint(0, 256, size=(4,) + model.image_shape).astype(np.uint8)
  model.initialize(images)
  for w in model.trainable_weights:
    if not np.any(w.numpy()):
      w.assign(rng.normal(0., std, size=w.shape).astype(w.dtype))
  return model


def time_sampling(model, batch_size=8, repeats=5, temperature=1.0, mode='graph', seed=0):
  """(mean, std) seconds of drawing `batch_size` images, after one warm-up draw."""
  if mode == 'eager':
    draw = lambda i: to_images(model.sample_values(batch_size, temperature, seed + i))
  elif mode == 'graph':
    fn = tf.function(lambda n, t, s: to_images(model.sample_values(n, t, s)), input_signature=[
        tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.int32)])
    draw = lambda i: fn(tf.constant(batch_size), tf.constant(temperature, tf.float32),
                        tf.constant(seed + i))
  else:
    raise ValueError(f"mode must be 'eager' or 'graph', got {mode!r}.")
  draw(0).numpy()  # warm-up (and tracing in graph mode)
  times = []
  for i in range(1, repeats + 1):
    start = time.perf_counter()
    draw(i).numpy()
    times.append(time.perf_counter() - start)
  return float(np.mean(times)), float(np.std(times))


def run(sizes=SIZES, channels=3, coupling='mixlogcdf', batch_size=8, repeats=5,
        modes=('eager', 'graph'), verbose=False, **config_overrides):
  """One dict per size: N, levels, steps (sequential MARPS steps), pixel_steps (N^2 C), and
  '<mode>_seconds' / '<mode>_std' for each timing mode."""
  rows = []
  for size in sizes:
    config = timing_config(size, channels, coupling, **config_overrides)
    model = randomize(build_model(config))
    steps = model.num_sequential_sampling_steps
    if steps != marps_num_steps(config.num_levels, channels):
      raise AssertionError(f'step count {steps} disagrees with the formula at N={size}.')
    row = dict(N=size, levels=config.num_levels, steps=steps, pixel_steps=size * size * channels)
    for mode in modes:
      row[f'{mode}_seconds'], row[f'{mode}_std'] = time_sampling(model, batch_size, repeats,
                                                                 mode=mode)
    rows.append(row)
    if verbose:
      print(format_table([row], header=not rows[:-1]), flush=True)
  return rows


def format_table(rows, header=True):
  """Fixed-width text table of ``run`` rows."""
  modes = [k[:-len('_seconds')] for k in rows[0] if k.endswith('_seconds')] if rows else []
  cols = ['N', 'levels', 'seq. steps', 'pixel-AR steps'] + [f'{m} s (+-std)' for m in modes]
  widths = [4, 6, 10, 14] + [18] * len(modes)
  lines = []
  if header:
    lines.append('  '.join(c.rjust(w) for c, w in zip(cols, widths)))
  for r in rows:
    cells = [str(r['N']), str(r['levels']), str(r['steps']), str(r['pixel_steps'])]
    cells += [f"{r[f'{m}_seconds']:.3f} +- {r[f'{m}_std']:.3f}" for m in modes]
    lines.append('  '.join(c.rjust(w) for c, w in zip(cells, widths)))
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--sizes', default=','.join(map(str, SIZES)),
                      help='comma-separated image sizes N (powers of two >= 4)')
  parser.add_argument('--channels', type=int, default=3, help='image channels C')
  parser.add_argument('--coupling', default='mixlogcdf', choices=('affine', 'mixlogcdf'))
  parser.add_argument('--batch_size', type=int, default=8, help='images per draw (paper: 8)')
  parser.add_argument('--repeats', type=int, default=5, help='timed draws per size')
  parser.add_argument('--modes', default='eager,graph', help='eager and/or graph')
  args = parser.parse_args(argv)
  sizes = tuple(int(s) for s in args.sizes.split(','))
  modes = tuple(m for m in args.modes.split(',') if m)
  print(f'MARPS sampling time, C={args.channels}, batch {args.batch_size}, {args.coupling} '
        f'couplings, mean +- std over {args.repeats} draws')
  run(sizes, args.channels, args.coupling, args.batch_size, args.repeats, modes, verbose=True)


if __name__ == '__main__':
  main()
