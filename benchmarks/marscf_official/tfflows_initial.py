"""tfflows' side of the start-up check: the mAR-SCF of configs/marscf_affine_mnist.flags, its
trainable parameter count and the test bits/dim after ActNorm initialisation (no training).

The model is built from the flagfile's settings with tfflows.FlowConfig (no absl flags), ActNorm
is initialised on the first training batch of the order ``official_train.py`` draws for the
same --seed, and the one-sample bound is averaged over the 500 test digits. Compare with

    official_train.py --initial_eval --epochs=0 ...   (its 'initial_test_bpd' and parameters)

Run it single-threaded:

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1 \\
      .venv/bin/python benchmarks/marscf_official/tfflows_initial.py --seed=0
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--eval_batch_size', type=int, default=100)
  args = p.parse_args(argv)
  sys.path.insert(0, ROOT)
  import keras  # pylint: disable=import-outside-toplevel
  import tfflows  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(args.seed)
  config = tfflows.FlowConfig(model='marscf', image_shape=(32, 32, 1), coupling='affine',
                              num_levels=3, steps_per_level=4, width=32, scale_fn='sigmoid',
                              conv1x1='lu', mar_hidden=16, mar_layers=2)
  model = tfflows.build_model(config)
  params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
  with np.load(os.path.join(ROOT, 'tfflows', 'data', 'mnist5k.npz')) as npz:
    train, test = npz['x_train'], npz['x_test']
  order = np.random.RandomState(args.seed).permutation(len(train))
  model.initialize(train[order[:args.batch_size]])
  bpd = np.concatenate([model.bits_per_dim(test[i:i + args.eval_batch_size]).numpy()
                        for i in range(0, len(test), args.eval_batch_size)])
  groups = {}
  for v in model.trainable_variables:
    key = 'prior' if 'prior' in v.path else 'flow'
    groups[key] = groups.get(key, 0) + int(np.prod(v.shape))
  print(json.dumps(dict(side='tfflows', seed=args.seed, parameters=params, by_part=groups,
                        initial_test_bpd=float(bpd.mean()))))


if __name__ == '__main__':
  main()
