"""The LCMA ablation on the embedded MNIST digits: four split options, one analysis.

    python -m train.lcma_ablation --workdir=/tmp/lcma_ablation [--steps=300 ...]

1. pre-trains a small RealNVP with no factoring out (split='none') for --pretrain_steps;
2. analyses it on the training digits and writes WORKDIR/lcma_masks.npz;
3. trains the split options static, random, lcma and lcma_reverse (the paper's table 2) for
   the same --steps from the same initial weights and the same batches;
4. prints the test bits/dim of each (the one-sample bound over the 500 test digits, fixed
   noise seed; also the midpoint-dequantized value) and the paired difference to static, and
   writes WORKDIR/ablation.json.

The paper's ordering (CelebA, full training): LCMA 2.71 < static 3.02 < random 3.05 <
lcma_reverse 3.10. With a few hundred CPU steps on a tiny model the differences here are
small and say little about converged models; the figures are what was measured, no more.
"""

import argparse
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

import tfflows
from tfflows import lcma
from tfflows.data import load_embedded

ARMS = ('static', 'random', 'lcma', 'lcma_reverse')


def _config(args, split, masks=''):
  return tfflows.FlowConfig(model='realnvp', image_shape=(32, 32, 1),
                            num_scales=args.num_scales, res_blocks=args.res_blocks,
                            base_width=args.base_width, logit_alpha=0.05, split=split,
                            lcma_masks=masks)


def _batches(images, batch_size, seed):
  ds = tf.data.Dataset.from_tensor_slices(images)
  ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True).repeat()
  return ds.batch(batch_size, drop_remainder=True).prefetch(2)


def _train(model, images, steps, args):
  """Adam 1e-3, L2 5e-5 on weight-norm scales, clipping at 100 (the paper's settings)."""
  model.compile(keras.optimizers.Adam(args.learning_rate), max_grad_norm=100., scale_l2=5e-5,
                jit_compile=args.jit_compile)
  started = time.perf_counter()
  history = model.fit(_batches(images, args.batch_size, args.seed), epochs=1,
                      steps_per_epoch=steps, verbose=0)
  return time.perf_counter() - started, float(history.history['bpd'][-1])


def _test_bpd(model, images, seed):
  """Per-image test bits/dim: one-sample bound (stateless seed) and midpoint dequantization."""
  bound, midpoint = [], []
  for i in range(0, len(images), 100):
    batch = images[i:i + 100]
    bound.append(model.bits_per_dim(batch, seed=seed + i).numpy())
    log_w = model.log_weight(tf.cast(batch, tf.float32), midpoint=True)
    midpoint.append(model.to_bits_per_dim(log_w).numpy())
  return np.concatenate(bound), np.concatenate(midpoint)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--pretrain_steps', type=int, default=300)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=1e-3)
  parser.add_argument('--num_scales', type=int, default=3)
  parser.add_argument('--res_blocks', type=int, default=1)
  parser.add_argument('--base_width', type=int, default=16)
  parser.add_argument('--analysis_images', type=int, default=4500)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--arms', default=','.join(ARMS))
  parser.add_argument('--jit_compile', type=int, default=0)  # XLA: slow to compile on CPU
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  train, _ = load_embedded('train')
  test, _ = load_embedded('test')
  train, test = np.array(train), np.array(test)
  results = {'args': vars(args), 'arms': {}}

  keras.utils.set_random_seed(args.seed)
  pre = tfflows.build_model(_config(args, 'none'))
  seconds, bpd = _train(pre, train, args.pretrain_steps, args)
  pre_bound, _ = _test_bpd(pre, test, 10_000)
  print(f'pre-train (split=none): {args.pretrain_steps} steps in {seconds:.0f} s, '
        f'train {bpd:.3f}, test {pre_bound.mean():.4f} bits/dim', flush=True)
  results['pretrain'] = {'steps': args.pretrain_steps, 'seconds': seconds,
                         'test_bpd': float(pre_bound.mean())}

  masks = os.path.join(args.workdir, lcma.MASKS_NAME)
  contributions = lcma.analyze(pre, [train[i:i + 500] for i in range(0, len(train), 500)],
                               max_examples=args.analysis_images, seed=args.seed)
  lcma.write_masks(masks, contributions, metadata={'source': 'train.lcma_ablation'})
  print(lcma.describe(contributions), flush=True)

  bounds = {}
  for arm in args.arms.split(','):
    keras.utils.set_random_seed(args.seed + 1)  # the same initial weights for every arm
    model = tfflows.build_model(_config(args, arm, masks))
    seconds, bpd = _train(model, train, args.steps, args)
    bound, midpoint = _test_bpd(model, test, 10_000)
    bounds[arm] = bound
    results['arms'][arm] = {
        'seconds': seconds, 'train_bpd_last_epoch': bpd,
        'test_bpd': float(bound.mean()),
        'test_bpd_stderr': float(bound.std() / math.sqrt(bound.size)),
        'test_bpd_midpoint': float(midpoint.mean())}
    print(f'{arm:13s} {args.steps} steps in {seconds:.0f} s: test {bound.mean():.4f} '
          f'(+-{bound.std() / math.sqrt(bound.size):.4f}) bits/dim, midpoint '
          f'{midpoint.mean():.4f}', flush=True)
  if 'static' in bounds:
    for arm, bound in bounds.items():
      diff = bound - bounds['static']
      results['arms'][arm]['minus_static'] = float(diff.mean())
      results['arms'][arm]['minus_static_stderr'] = float(diff.std() / math.sqrt(diff.size))
  with open(os.path.join(args.workdir, 'ablation.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  print('\narm            test bits/dim   minus static (paired)')
  for arm, r in results['arms'].items():
    extra = (f'{r["minus_static"]:+.4f} +- {r["minus_static_stderr"]:.4f}'
             if 'minus_static' in r else '')
    print(f'{arm:13s}  {r["test_bpd"]:.4f}          {extra}')
  return results


if __name__ == '__main__':
  main()
