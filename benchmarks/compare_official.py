"""tfflows against the authors' PyTorch code: the same data, model and budget, several seeds.

--model=denseflow trains ``configs/mnist.flags`` with ``python -m train.main`` (float32
networks unless --tfflows_flags says otherwise) and the official DenseFlow
(github.com/matejgrcic/DenseFlow) with ``denseflow_official/official_train.py``;
--model=marscf trains ``configs/marscf_affine_mnist.flags`` and the official mAR-SCF
(github.com/visinf/mar-scf) with ``marscf_official/official_train.py``. Each official program
gives its model the data, optimiser, schedule, clipping and scoring of the flagfile (see its
docstring). Every (side, seed) runs as its own process on one thread, --parallel at a time; the
table has the test bits/dim (one-sample bound, after each of the shown epochs) and the final
importance-weighted estimate (k = 16) per run, then the mean, standard deviation and range.

    python benchmarks/compare_official.py --model=denseflow --official_repo=/path/to/DenseFlow \\
        --torch_python=/path/to/venv/bin/python --seeds=0,1,2 --out_dir=runs/compare_denseflow

Each run writes ``OUT_DIR/<label>_s<seed>.json`` and is skipped when that file exists, so an
interrupted comparison resumes, and further arms (``--label=... --tfflows_flags=...`` or
``--official_flags=...``) add rows to the same table. ``--sides`` picks tfflows, official or
both. ``--report`` only prints the table of what OUT_DIR holds.
"""

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EPOCH_LINE = re.compile(r'epoch (\d+), step (\d+): train ([\d.]+) bits/dim, test ([\d.]+) '
                        r'bits/dim, .* mean gradient norm ([\d.e+]+)')
# model: (flagfile, official program, epochs shown)
MODELS = {'denseflow': ('configs/mnist.flags', 'denseflow_official/official_train.py', (2, 4, 8)),
          'marscf': ('configs/marscf_affine_mnist.flags', 'marscf_official/official_train.py',
                     (1, 2, 3))}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='denseflow', choices=sorted(MODELS))
  p.add_argument('--official_repo', default='',
                 help='checkout of the authors\' code (matejgrcic/DenseFlow, visinf/mar-scf)')
  p.add_argument('--torch_python', default=sys.executable,
                 help='a Python with torch and numpy, for the official side')
  p.add_argument('--tfflows_python', default=sys.executable)
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--sides', default='tfflows,official')
  p.add_argument('--label', default='', help='row label prefix of this arm (default: the side)')
  p.add_argument('--tfflows_flags', default='--conditioner_precision=float32',
                 help='extra flags of train.main after the flagfile')
  p.add_argument('--official_flags', default='', help='extra flags of official_train.py')
  p.add_argument('--parallel', type=int, default=2, help='runs at a time (one thread each)')
  p.add_argument('--out_dir', default='', help='default: runs/compare_<model>')
  p.add_argument('--report', action='store_true', help='only print the table')
  return p.parse_args(argv)


def one_thread_env():
  return dict(os.environ, TF_NUM_INTRAOP_THREADS='1', TF_NUM_INTEROP_THREADS='1',
              OMP_NUM_THREADS='1', TF_CPP_MIN_LOG_LEVEL='2')


def run_tfflows(args, seed, label, out):
  workdir = os.path.join(args.out_dir, f'{label}_s{seed}')
  cmd = [args.tfflows_python, '-m', 'train.main', f'--flagfile={MODELS[args.model][0]}',
         '--mode=train,eval', f'--seed={seed}', f'--workdir={workdir}',
         *shlex.split(args.tfflows_flags)]
  log = _run(cmd, workdir + '.log')
  epochs = []
  for m in EPOCH_LINE.finditer(log):
    epochs.append(dict(epoch=int(m[1]), step=int(m[2]), train_bpd=float(m[3]),
                       test_bpd=float(m[4]), grad_norm_mean=float(m[5])))
  evals = sorted(glob.glob(os.path.join(workdir, 'eval', '*_k*.json')))
  if not epochs or not evals:
    raise RuntimeError(f'{label} seed {seed}: no epoch lines or eval file; see {workdir}.log')
  with open(evals[-1], encoding='utf-8') as f:
    final = json.load(f)
  return dict(side='tfflows', label=label, seed=seed, command=shlex.join(cmd), epochs=epochs,
              final_bound=final['bits_per_dim_bound'], final_iw=final['bits_per_dim_iw'])


def run_official(args, seed, label, out):
  if not args.official_repo:
    raise SystemExit('--official_repo is required for the official side.')
  raw = out + '.raw'
  cmd = [args.torch_python, os.path.join(HERE, MODELS[args.model][1]),
         f'--official_repo={args.official_repo}', f'--seed={seed}', '--threads=1',
         f'--out={raw}', *shlex.split(args.official_flags)]
  _run(cmd, out[:-len('.json')] + '.log')
  with open(raw, encoding='utf-8') as f:
    result = json.load(f)
  os.remove(raw)
  return dict(result, label=label, command=shlex.join(cmd))


def _run(cmd, log_path):
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), stdout=log,
                          stderr=subprocess.STDOUT, check=False)
  with open(log_path, encoding='utf-8') as f:
    text = f.read()
  if proc.returncode:
    raise RuntimeError(f'{shlex.join(cmd)} failed (rc {proc.returncode}); see {log_path}')
  return text


def run_one(args, side, seed):
  label = f'{args.label}{side}' if args.label else side
  out = os.path.join(args.out_dir, f'{label}_s{seed}.json')
  if os.path.exists(out):
    return out
  result = (run_tfflows if side == 'tfflows' else run_official)(args, seed, label, out)
  tmp = out + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, out)
  print(f'done: {label} seed {seed}', flush=True)
  return out


def test_at(result, epoch):
  for row in result['epochs']:
    if row['epoch'] == epoch and 'test_bpd' in row:
      return row['test_bpd']
  return float('nan')


def table(out_dir, shown):
  """Markdown rows: one per run, then mean +- standard deviation (and range) per label."""
  runs = {}
  for path in sorted(glob.glob(os.path.join(out_dir, '*_s*.json'))):
    with open(path, encoding='utf-8') as f:
      r = json.load(f)
    runs.setdefault(r['label'], []).append(r)
  header = (['run', 'seed'] + [f'epoch {e}' for e in shown]
            + [f'epoch {shown[-1]}: IW k=16', 'max epoch grad norm'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for label, results in runs.items():
    values = []
    for r in sorted(results, key=lambda r: r['seed']):
      row = [test_at(r, e) for e in shown] + [r['final_iw']]
      values.append(row)
      grad = max(e.get('grad_norm_mean', float('nan')) for e in r['epochs'])
      lines.append(f'| {label} | {r["seed"]} | ' + ' | '.join(f'{v:.3f}' for v in row)
                   + f' | {grad:.0f} |')
    v = np.array(values)
    if len(v) > 1:
      cells = [f'{m:.3f} +- {s:.3f} ({lo:.3f}-{hi:.3f})' for m, s, lo, hi in
               zip(v.mean(0), v.std(0, ddof=1), v.min(0), v.max(0))]
      lines.append(f'| **{label}: mean +- sd (range)** | {len(v)} | ' + ' | '.join(cells) + ' | |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  args.out_dir = args.out_dir or os.path.join(ROOT, 'runs', f'compare_{args.model}')
  os.makedirs(args.out_dir, exist_ok=True)
  if not args.report:
    seeds = [int(s) for s in args.seeds.split(',')]
    jobs = [(side, seed) for seed in seeds for side in args.sides.split(',')]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      futures = [pool.submit(run_one, args, side, seed) for side, seed in jobs]
      for future in concurrent.futures.as_completed(futures):
        future.result()
  print(table(args.out_dir, MODELS[args.model][2]))


if __name__ == '__main__':
  main()
