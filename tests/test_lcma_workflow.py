"""LCMA's three invocations through the training program: pre-train with no factoring out,
--mode=lcma_analyze from that workdir, then train and export the LCMA model from the file."""

import json
import os

import numpy as np
import pytest

from tests.test_train import _main
from train import modes

TINY_REALNVP = ['--model=realnvp', '--num_scales=2', '--res_blocks=1', '--base_width=4',
                '--epochs=1', '--steps_per_epoch=2', '--nojit_compile', '--eval_batches=1',
                '--bn_refresh_batches=1']


@pytest.mark.slow  # about 50 s on 2 cores; tests/test_lcma.py runs the same workflow through the API
def test_two_phase_workflow_end_to_end(tmp_path):
  pretrain, final = str(tmp_path / 'pretrain'), str(tmp_path / 'lcma')
  masks = str(tmp_path / 'lcma' / 'lcma_masks.npz')
  _main(*TINY_REALNVP, '--split=none', f'--workdir={pretrain}', '--mode=train')
  _main(*TINY_REALNVP, '--split=lcma', f'--lcma_masks={masks}', f'--workdir={final}',
        '--mode=lcma_analyze', f'--init_from={pretrain}')
  assert os.path.exists(masks)
  _main(*TINY_REALNVP, '--split=lcma', f'--lcma_masks={masks}', f'--workdir={final}',
        '--mode=train,eval,export')
  with open(os.path.join(final, 'config.json')) as f:
    config = json.load(f)
  assert config['split'] == 'lcma' and config['lcma_masks'] == masks
  with open(modes.result_path(final, 'eval', 2, k=4, num_images=16)) as f:
    assert np.isfinite(json.load(f)['bits_per_dim_bound'])
  assert os.listdir(os.path.join(final, 'export'))
