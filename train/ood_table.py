r"""The AUROC table of ``--mode=ood`` over several runs (seeds): mean +- std per set.

    python -m train.ood_table --workdirs=runs/ood/glow_s0,runs/ood/glow_s1,runs/ood/glow_s2

reads the newest ``ood/ckpt-<step>_k<k>*.json`` of each workdir (the last checkpoint's, written
by ``python -m train.main --mode=ood``) and prints a Markdown table: per out-of-distribution set,
the AUROC of the raw bits/dim, of the complexity-corrected score and of the typicality test's
batch distance, and the typicality test's detection rate at its threshold, each as mean +- std
(sample standard deviation, ddof=1) over the runs, then the typicality test's false-positive
rate on in-distribution batches.
"""

import glob
import json
import os
import re
import sys

import numpy as np
from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_list('workdirs', [], 'Workdirs that ran --mode=ood (one per seed).')
flags.DEFINE_integer('k', 1, 'k of the results to read (--export_importance_samples of the '
                     'ood run).', lower_bound=1)
COLUMNS = (('auroc_bits_per_dim', 'AUROC bits/dim'), ('auroc_score', 'AUROC score S'),
           ('auroc_complexity', 'AUROC PNG complexity alone'),
           ('typicality_auroc', 'typicality AUROC (batches of M)'),
           ('typicality_detection_rate', 'typicality detection rate'))


def newest_result(workdir, k):
  """The ood JSON of the highest checkpoint step in workdir/ood with this k."""
  pattern = re.compile(rf'ckpt-(\d+)_k{k}(_seed\d+)?\.json$')
  found = [(int(m.group(1)), path) for path in glob.glob(os.path.join(workdir, 'ood', '*.json'))
           if (m := pattern.search(os.path.basename(path)))]
  if not found:
    raise FileNotFoundError(f'{workdir}/ood has no ckpt-<step>_k{k}.json: run '
                            f'`python -m train.main --workdir={workdir} --mode=ood` first.')
  with open(max(found)[1], encoding='utf-8') as f:
    return json.load(f)


def _cell(values):
  values = np.asarray(values, np.float64)
  spread = values.std(ddof=1) if values.size > 1 else 0.
  return f'{values.mean():.3f} +- {spread:.3f}'


def table(results):
  """Markdown lines of the table over ``results`` (ood JSONs of one model, one per seed)."""
  from tfflows.data import ood_sets  # pylint: disable=import-outside-toplevel
  names = [n for n in ood_sets.NAMES if n in results[0]['sets']]
  names += sorted(set(results[0]['sets']) - set(names))
  lines = ['| set | ' + ' | '.join(title for _, title in COLUMNS) + ' |',
           '| --- |' + ' --- |' * len(COLUMNS)]
  for name in names:
    cells = [_cell([r['sets'][name][key] for r in results]) for key, _ in COLUMNS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  fpr = _cell([r['in_distribution']['typicality_false_positive_rate'] for r in results])
  typicality = results[0]['typicality']
  lines.append('')
  lines.append(f'{len(results)} runs (seeds {", ".join(str(r["seed"]) for r in results)}); '
               f'typicality M = {typicality["batch_size"]}, alpha = {typicality["alpha"]}; '
               f'false-positive rate on in-distribution batches {fpr}; test bits/dim '
               f'{_cell([r["in_distribution"]["mean_bits_per_dim"] for r in results])}.')
  return lines


def main(argv):
  del argv
  if not FLAGS.workdirs:
    raise app.UsageError('--workdirs: give the workdirs of the runs, comma-separated.')
  try:
    results = [newest_result(w, FLAGS.k) for w in FLAGS.workdirs]
  except FileNotFoundError as error:
    sys.exit(f'train.ood_table: error: {error}')
  print('\n'.join(table(results)))


if __name__ == '__main__':
  app.run(main)
