"""The training program train.main: flags, training and resuming, eval, samples, export.

Runs happen in this process (``_main``: parse the flags, call ``train.main.main``;
MirroredStrategy uses the two logical CPU devices of tests/conftest.py) except where a separate
process is what is tested: the quiet start-up of the command line and a run killed by SIGKILL.
"""

import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl import flags
from PIL import Image

from tests import flagfiles
from tests import flow_checks
import tfflows
from tfflows.models import denseflow
from train import callbacks
from train import checkpoint_contents
from train import checkpoint_files
from train import checkpoints
from train import flags as train_flags
from train import main as train_main
from train import modes
from train import schedule
from train import trainer
from train.flags import FLAGS
from train.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.flags')


def _parse(*args):
  """Parses the tiny flagfile and args into FLAGS, every other flag at its default."""
  FLAGS.unparse_flags()
  FLAGS(['train.main', f'--flagfile={TINY}', *args])
  return FLAGS


def _main(*args):
  """Runs the program in this process (as `python -m train.main --flagfile=tiny ...`)."""
  _parse(*args)
  train_main.main(['train.main'])


def _cli(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-m', 'train.main', f'--flagfile={TINY}', *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ckpt_value(prefix, key):
  return tf.train.load_checkpoint(prefix).get_tensor(f'{key}/.ATTRIBUTES/VARIABLE_VALUE')


def _steps(workdir, sub='checkpoints'):
  return sorted(checkpoint_files.step_of(p[:-len('.index')])
                for p in glob.glob(os.path.join(workdir, sub, 'ckpt-*.index')))


def _tags(logdir):
  tags = set()
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  return tags


# ---------------------------------------------------------------------------------- flags
def test_flagfile_values_are_overridden_by_the_command_line(tmp_path):
  f = _parse(f'--workdir={tmp_path}', '--width=12', '--block_conf=1,2,3', '--batch_size=8')
  run = Run.from_flags(f, modes.MODES)
  assert (f.width, f.batch_size, f.steps_per_level) == (12, 8, 2)  # 8 and 16 in the file
  assert run.config.width == 12 and run.config.block_conf == (1, 2, 3)
  assert run.config.image_shape == (32, 32, 1)  # from the dataset
  assert run.modes == ['train'] and run.temperatures == [1.0, 0.8]


def test_every_config_field_is_a_documented_flag():
  """A FlowConfig field becomes a flag by itself; its help must come from MODEL_HELP, the
  field's metadata or its comment in config.py, not the generated fallback."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  for field in dataclasses.fields(tfflows.FlowConfig):
    flag = FLAGS[train_flags.model_flag_name(field.name)]
    assert flag.help != f'FlowConfig.{field.name}.', field.name


@pytest.mark.parametrize('args, message', [
    (['--batch_size=abc'], 'batch_size'),
    (['--lr_decay=1.5'], 'lr_decay'),
    (['--dataset=imagenet128'], 'dataset'),
    (['--block_conf=1,x'], 'block_conf'),
    (['--temperatures=-1'], 'temperatures'),
    (['--no_such_flag=1'], 'no_such_flag'),
])
def test_bad_flag_values_name_the_flag(args, message):
  with pytest.raises(flags.Error, match=message):
    _parse(*args)


@pytest.mark.parametrize('args, message', [
    (['--mode=train,fly'], 'unknown mode fly'),
    (['--model=pixelcnn'], 'pixelcnn'),
    (['--coupling=spline'], 'coupling'),
    (['--image_shape=28,28,1'], 'image_shape=28,28,1 does not match'),
    (['--mode=eval'], r'--mode=eval needs a trained model'),
    (['--mode=sample,train'], r'--mode=sample needs a trained model'),
    (['--mixed_precision'], 'mixed_precision needs a GPU'),
    (['--init_from=/nonexistent/run'], 'init_from=/nonexistent/run: no checkpoint'),
])
def test_contradictory_or_invalid_combinations_name_the_flags(tmp_path, args, message):
  f = _parse(f'--workdir={tmp_path}', *args)
  with pytest.raises(app.UsageError, match=message):
    Run.from_flags(f, modes.MODES)


def test_cli_stops_with_a_message_naming_the_problem(tmp_path):
  result = _cli(f'--workdir={tmp_path}', '--steps_per_levle=3')
  assert result.returncode != 0
  assert 'steps_per_levle' in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))
  # No start-up noise from TensorFlow (train/quiet.py): absl's pre-initialisation notice, its
  # info lines, and on a machine without a CUDA driver the cuInit failure.
  for noise in ('absl::InitializeLog', 'cudart_stub', 'port.cc', 'failed call to cuInit'):
    assert noise not in result.stderr, result.stderr[:2000]


def test_quiet_filter_drops_only_the_noise():
  from train import quiet  # pylint: disable=import-outside-toplevel
  lines = {
      b'WARNING: All log messages before absl::InitializeLog() is called are written to '
      b'STDERR\n': False,
      b'I0000 00:00:1796085515.361866    5498 port.cc:153] oneDNN custom operations are on.\n':
          False,
      b'I0000 00:00:1796085515.362162    5498 cudart_stub.cc:31] Could not find cuda drivers '
      b'on your machine, GPU will not be used.\n': False,
      b'E0000 00:00:1796085542.993309    5987 cuda_platform.cc:52] failed call to cuInit: '
      b'INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n': False,
      b'E0000 00:00:1796085542.993309    5987 other.cc:52] a real error\n': True,
      b'W1201 00:40:04.473713 140352233753472 file.py:394] a warning\n': True,
      b'Illegal instruction (core dumped)\n': True,
      b'To enable the following instructions: AVX2 FMA\n': True,
  }
  keep = quiet.make_line_filter(level=2, cuda_driver=False)
  assert {line: keep(line) for line in lines} == lines
  with_driver = quiet.make_line_filter(level=2, cuda_driver=True)
  assert with_driver(b'E0000 00:00:1.2 5 cuda_platform.cc:52] failed call to cuInit: 303\n')
  everything = quiet.make_line_filter(level=0, cuda_driver=False)
  assert everything(b'I0000 00:00:1.2 5 port.cc:153] oneDNN custom operations are on.\n')


def test_help_lists_the_program_flags_by_group_and_exits_0(capsys):
  for args, full in ((['--help'], False), (['-h'], False), (['--helpshort'], False),
                     (['--flagfile=x', '--helpfull'], True)):
    with pytest.raises(SystemExit) as stopped:
      train_main.parse_flags(['train.main', *args])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    titles = [text.index(f'\n{title}:\n') for title, _ in train_flags.GROUPS]
    assert titles == sorted(titles)  # Run, Data, Model, Training, Evaluation, Export
    for title, names in train_flags.GROUPS:
      section = text[text.index(f'\n{title}:\n'):]
      for name in names:
        assert re.search(rf'^  --(\[no\])?{name}[= ]', section, re.M), (title, name)
    assert ('--test_srcdir' in text) == full and ('--verbosity' in text) == full
    if full:  # the program's flags first, then the libraries'
      assert text.index('--batch_size') < text.index('Flags of the libraries') < text.index(
          '--verbosity')
  # Every program flag is in exactly one group; --mode's help names every mode.
  grouped = [name for _, names in train_flags.GROUPS for name in names]
  assert sorted(grouped) == sorted(f.name for f in train_flags.program_flags())
  for mode in modes.MODES:
    assert mode in FLAGS['mode'].help


def test_result_files_are_keyed_by_checkpoint_and_settings():
  def path(*args, **kwargs):
    return modes.result_path('W', *args, **kwargs)
  assert path('eval', 1120, k=100) == os.path.join('W', 'eval', 'ckpt-1120_k100.json')
  assert path('eval', 1120, k=8, num_images=32, seed=3) == os.path.join(
      'W', 'eval', 'ckpt-1120_k8_n32_seed3.json')
  assert path('samples', 1120, temperature=0.8) == os.path.join('W', 'samples',
                                                                 'step1120_t0.8.png')
  assert path('samples', 1120, temperature=1.0, seed=2) == os.path.join(
      'W', 'samples', 'step1120_t1_seed2.png')
  with pytest.raises(ValueError, match='unknown result kind'):
    path('histogram', 1)


def test_missing_data_says_where_to_put_it(tmp_path, capsys, caplog):
  empty = tmp_path / 'data'
  empty.mkdir()
  with caplog.at_level(logging.INFO, logger='absl'), \
       pytest.raises(SystemExit, match=r'dataset=cifar10: data not found.*--data_dir.*'
                                       r'tfds build cifar10') as stopped:
    _main(f'--workdir={tmp_path / "run"}', '--dataset=cifar10', f'--data_dir={empty}',
          '--verbosity=0')
  assert not _steps(tmp_path / 'run')
  assert 'TFDS said' not in str(stopped.value)  # no folder at all: nothing more to say
  logged = capsys.readouterr().err + caplog.text
  assert '--mode=train in' in logged   # the log is seen here
  assert 'data not found' not in logged  # printed once, by the exit
  assert 'dataset_info.json' not in logged  # no TFDS warning about the absent folder


# ------------------------------------------------------------------------------- schedule
def test_learning_rate_schedule_warms_up_then_decays_per_epoch():
  lr = schedule.WarmupExponentialDecay(1e-3, warmup_steps=4, decay=0.5, steps_per_epoch=10)
  got = [float(lr(t)) for t in (0, 1, 3, 9, 10, 25)]
  np.testing.assert_allclose(got, [2.5e-4, 5e-4, 1e-3, 1e-3, 5e-4, 2.5e-4], rtol=1e-6)
  flat = schedule.WarmupExponentialDecay(2e-5, warmup_steps=0, decay=1., steps_per_epoch=3)
  assert float(flat(0)) == pytest.approx(2e-5) and float(flat(100)) == pytest.approx(2e-5)


# ------------------------------------------------------------------- training and resuming
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny run: 1 epoch of 4 steps (checkpoints at steps 3 and 4), with jit_compile."""
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  _main(f'--workdir={workdir}', '--epochs=1')
  return workdir


def test_training_writes_checkpoints_best_and_tensorboard(trained):
  assert _steps(trained) == [3, 4]
  assert _steps(trained, 'best') == [4]
  with open(os.path.join(trained, 'best', 'best.json'), encoding='utf-8') as f:
    best = json.load(f)
  assert best['step'] == 4 and np.isfinite(best['test_bits_per_dim'])
  prefix = os.path.join(trained, 'checkpoints', 'ckpt-4')
  assert _ckpt_value(prefix, 'optimizer/_iterations') == 4
  assert _ckpt_value(prefix, 'step') == 4 and _ckpt_value(prefix, 'epoch') == 1
  config = tfflows.FlowConfig.from_json(open(os.path.join(trained, 'config.json')).read())
  assert config.width == 8 and config.image_shape == (32, 32, 1)
  train_tags = _tags(os.path.join(trained, 'tensorboard', 'train'))
  assert {'bits_per_dim', 'loss', 'grad_norm', 'learning_rate', 'images_per_second',
          'samples/temperature_1', 'samples/temperature_0.8'} <= train_tags
  assert 'bits_per_dim' in _tags(os.path.join(trained, 'tensorboard', 'test'))


def test_restore_gives_the_saved_optimizer_state(tmp_path):
  """Weights, ActNorm flags, Adamax moments, iterations and the SeedGenerator state come back
  exactly as they were saved."""
  run = Run.from_flags(_parse(f'--workdir={tmp_path}', '--nojit_compile'), modes.MODES)
  lr = schedule.WarmupExponentialDecay(1e-3, 2, 0.9, 4)
  model = trainer.build_training_model(run, lr)
  model.fit(run.images('train', 32), batch_size=16, epochs=1, verbose=0)
  saver = checkpoints.Checkpointer(str(tmp_path), model, model.optimizer, keep=2)
  prefix = saver.save(2, 0)
  saved = [np.array(v) for v in model.optimizer.variables]
  weights = [np.array(v) for v in model.variables]
  moments = [s for s, v in zip(saved, model.optimizer.variables) if 'momentum' in v.path]
  assert moments and any(np.any(m) for m in moments)  # the moments are not all zero
  restored = trainer.build_training_model(run, lr)
  assert checkpoints.Checkpointer(str(tmp_path), restored, restored.optimizer,
                                  keep=2).restore_latest() == prefix
  assert int(restored.optimizer.iterations.numpy()) == 2
  for a, b in zip(saved, restored.optimizer.variables):
    np.testing.assert_array_equal(a, np.array(b))
  for a, b in zip(weights, restored.variables):
    np.testing.assert_array_equal(a, np.array(b), err_msg=b.path)
  flags_ = [np.array(v) for v in restored.variables if v.path.endswith('initialized')]
  assert flags_ and all(np.all(f == 1.) for f in flags_)   # stacked [K] for looped steps
  # The model alone (eval, sample, export, --init_from): every variable, the priors included.
  alone = tfflows.build_model(run.config)
  checkpoint_contents.restore_model(alone, prefix)
  for a, b in zip(weights, alone.variables):
    np.testing.assert_array_equal(a, np.array(b), err_msg=b.path)
  other = tfflows.build_model(run.config.replace(steps_per_level=1))
  with pytest.raises(ValueError, match='different architecture'):
    checkpoint_contents.restore_model(other, prefix)


def test_resume_continues_step_counter_schedule_and_optimizer(trained, tmp_path, capsys):
  """Rerunning resumes; a run stopped mid-epoch (latest checkpoint at step 3 of 4) finishes
  that epoch's last step first, then whole epochs."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  with open(os.path.join(workdir, 'checkpoints', 'checkpoint'), 'w', encoding='utf-8') as f:
    f.write('model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
  before = tf.train.load_checkpoint(os.path.join(workdir, 'checkpoints', 'ckpt-3'))
  _main(f'--workdir={workdir}', '--epochs=2', '--nojit_compile')
  assert _steps(workdir)[-1] == 8
  prefix = os.path.join(workdir, 'checkpoints', 'ckpt-8')
  assert _ckpt_value(prefix, 'optimizer/_iterations') == 8
  assert _ckpt_value(prefix, 'epoch') == 2
  # The moments moved on from those of step 3 (they were restored, not re-created at zero).
  after = tf.train.load_checkpoint(prefix)
  key = 'optimizer/_variables/3/.ATTRIBUTES/VARIABLE_VALUE'
  assert np.any(before.get_tensor(key)) and not np.array_equal(before.get_tensor(key),
                                                               after.get_tensor(key))
  with open(os.path.join(workdir, 'flags.txt'), encoding='utf-8') as f:
    assert '--epochs=2' in f.read().split()
  # Already at the end: a rerun trains nothing, keeps the step and says so (no NaN figures).
  capsys.readouterr()
  _main(f'--workdir={workdir}', '--epochs=2', '--nojit_compile')
  assert _steps(workdir)[-1] == 8
  out = capsys.readouterr().out
  assert 'train done: nothing to train, the workdir\'s checkpoint is at step 8 of 8' in out
  assert 'nan' not in out


def test_flags_txt_is_a_flagfile_that_reproduces_the_run(trained):
  path = os.path.join(trained, 'flags.txt')
  with open(path, encoding='utf-8') as f:
    lines = [line for line in f.read().splitlines() if not line.startswith('#')]
  names = {line.split('=')[0] for line in lines}
  for library_flag in ('--nohelp', '--test_srcdir', '--verbosity', '--flagfile', '--logtostderr'):
    assert library_flag not in names
  assert len(lines) == len(train_flags.program_flags()) - 1  # --data_dir (None) is left out
  original = {f.name: f.value for f in train_flags.program_flags(_parse(f'--workdir={trained}',
                                                                        '--epochs=1'))}
  FLAGS.unparse_flags()
  FLAGS(['train.main', f'--flagfile={path}'])
  assert {f.name: f.value for f in train_flags.program_flags()} == original
  with open(os.path.join(trained, 'config.json'), encoding='utf-8') as f:
    stored = tfflows.FlowConfig.from_dict(json.load(f))
  assert Run.from_flags(FLAGS, modes.MODES).config == stored


def test_fine_tune_starts_from_other_weights_with_a_fresh_optimizer(trained, tmp_path):
  workdir = str(tmp_path / 'finetune')
  _main(f'--workdir={workdir}', '--epochs=1', '--steps_per_epoch=1', f'--init_from={trained}',
        '--learning_rate=2e-5', '--warmup_steps=0', '--mode=train', '--nojit_compile')
  prefix = os.path.join(workdir, 'checkpoints', 'ckpt-1')
  assert _ckpt_value(prefix, 'optimizer/_iterations') == 1
  run = Run.from_flags(_parse(f'--workdir={workdir}'), modes.MODES)
  source = tfflows.build_model(run.config)
  checkpoint_contents.restore_model(source, os.path.join(trained, 'checkpoints', 'ckpt-4'))
  tuned = tfflows.build_model(run.config)
  checkpoint_contents.restore_model(tuned, prefix)
  # One Adamax step at lr 2e-5 moves each weight by at most the learning rate.
  moved = [float(np.max(np.abs(np.array(a) - np.array(b))))
           for a, b in zip(source.trainable_variables, tuned.trainable_variables)]
  assert 0. < max(moved) <= 2.1e-5


def test_nonfinite_loss_stops_without_a_poisoned_checkpoint(tmp_path):
  """At learning rate 1e30 the first update already gives a model with finite weights that
  returns NaN: training stops (exit status 1) before any checkpoint of it is written."""
  workdir = str(tmp_path)
  with pytest.raises(SystemExit, match='non-finite loss or gradient norm at step|NaN or Inf log-likelihood'):
    _main(f'--workdir={workdir}', '--learning_rate=1e30', '--warmup_steps=0', '--epochs=3',
          '--checkpoint_every_steps=1', '--nojit_compile', '--mode=train')
  _assert_every_checkpoint_is_good(workdir)


def _assert_every_checkpoint_is_good(workdir):
  """Every checkpoint of the workdir has finite values and a model that gives finite
  log-likelihoods of test images."""
  run = Run.from_flags(_parse(f'--workdir={workdir}', '--mode=train'), modes.MODES)
  images = run.images('test', 16)
  for sub in ('checkpoints', 'best'):
    for step in _steps(workdir, sub):
      prefix = os.path.join(workdir, sub, f'ckpt-{step}')
      reader = tf.train.load_checkpoint(prefix)
      for key in reader.get_variable_to_shape_map():
        value = reader.get_tensor(key)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
          assert np.all(np.isfinite(value)), (prefix, key)
      model = tfflows.build_model(run.config)
      checkpoint_contents.restore_model(model, prefix)
      assert np.all(np.isfinite(model.log_prob(images, seed=0).numpy())), prefix


# ------------------------------------------------------ eval, sample, interpolate, export
@pytest.fixture(scope='module')
def after_modes(trained):
  """Every reading mode on the tiny run in one invocation (one model restore)."""
  _main(f'--workdir={trained}', '--epochs=1',
        '--mode=eval,sample,interpolate,export,memorization')
  return trained


def test_eval_writes_bound_and_importance_weighted_bits_per_dim(after_modes):
  path = modes.result_path(after_modes, 'eval', 4, k=4, num_images=32)
  assert path == os.path.join(after_modes, 'eval', 'ckpt-4_k4_n32.json')
  with open(path, encoding='utf-8') as f:
    result = json.load(f)
  assert result['num_images'] == 32 and result['num_importance_samples'] == 4
  assert result['step'] == 4 and result['dataset'] == 'mnist_embedded'
  bound, iw = result['bits_per_dim_bound'], result['bits_per_dim_iw']
  assert np.isfinite(bound) and np.isfinite(iw) and 0. < iw < 9.
  assert iw <= bound + 1e-3  # log-likelihood: IW estimate >= the bound (bits/dim: <=)
  # The restored model scores the test images as the trained one did at its last epoch (the
  # same 32 images; only the dequantization noise differs).
  with open(os.path.join(after_modes, 'best', 'best.json'), encoding='utf-8') as f:
    assert bound == pytest.approx(json.load(f)['test_bits_per_dim'], abs=0.02)


def test_sample_and_interpolate_write_valid_png_grids(after_modes):
  names = ['step4_t1.png', 'step4_t0.8.png', 'step4_interpolation_linear.png',
           'step4_memorization_t1.png']
  assert [modes.result_path('', 'samples', 4, temperature=1.0),
          modes.result_path('', 'samples', 4, temperature=0.8),
          modes.result_path('', 'interpolation', 4, name='linear'),
          modes.result_path('', 'memorization', 4, temperature=1.)] == [
              os.path.join('samples', n) for n in names]
  sizes = {}
  for name in names:
    with Image.open(os.path.join(after_modes, 'samples', name)) as image:
      image.verify()
    with Image.open(os.path.join(after_modes, 'samples', name)) as image:
      sizes[name] = image.size
  # 4 samples: a 2 x 2 grid of 32 px images; interpolation: 4 steps a row, 2 rows.
  assert min(sizes['step4_t1.png']) >= 64
  width, height = sizes['step4_interpolation_linear.png']
  assert width > 4 * 32 and 2 * 32 < height < 3 * 32
  with open(os.path.join(after_modes, 'samples', 'step4_memorization_t1.json'),
            encoding='utf-8') as f:
    assert len(json.load(f)['nearest_l2']) == 2


def test_export_reloads_with_the_numbers_of_the_python_model(after_modes):
  from tfflows import export  # pylint: disable=import-outside-toplevel
  export_dir = os.path.join(after_modes, 'export', '4')
  loaded, config = export.load_exported(export_dir)
  assert config.width == 8
  run = Run.from_flags(_parse(f'--workdir={after_modes}', '--epochs=1', '--mode=eval'),
                       modes.MODES)
  model, _ = run.load_model()
  images = run.images('test', 5)
  served = loaded.signatures['serving_default'](images=tf.constant(images))
  np.testing.assert_array_equal(served['bits_per_dim'].numpy(),
                                model.bits_per_dim(images, seed=export.SERVING_SEED).numpy())
  np.testing.assert_array_equal(served['log_prob'].numpy(),
                                model.log_prob(images, seed=export.SERVING_SEED).numpy())
  drawn = loaded.signatures['sample'](num_samples=tf.constant(3), temperature=tf.constant(0.8),
                                      seed=tf.constant(7))['images']
  np.testing.assert_array_equal(drawn.numpy(), model.sample(3, 0.8, seed=7).numpy())


@pytest.fixture(name='op_determinism')
def _op_determinism():
  """--deterministic turns on TensorFlow's op determinism for the process: off again after."""
  yield
  from tensorflow.python.framework import config  # pylint: disable=import-outside-toplevel
  config.disable_op_determinism()


@pytest.mark.usefixtures('op_determinism')
def test_deterministic_runs_write_identical_checkpoints(tmp_path, capsys, caplog):
  readers = []
  for name in ('a', 'b'):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='absl'):
      _main(f'--workdir={tmp_path / name}', '--deterministic', '--nojit_compile', '--verbosity=0',
            '--epochs=1', '--steps_per_epoch=3', '--eval_batches=1', '--mode=train')
    out = capsys.readouterr()
    # Not a terminal: no progress-bar redraws, one line for the epoch.
    assert '\r' not in out.out + out.err + caplog.text and '\x08' not in out.err
    assert caplog.text.count('epoch 1, step 3: train') == 1
    readers.append(tf.train.load_checkpoint(str(tmp_path / name / 'checkpoints' / 'ckpt-3')))
  keys = [k for k in readers[0].get_variable_to_shape_map() if 'OBJECT_GRAPH' not in k]
  assert len(keys) > 50
  for key in keys:
    np.testing.assert_array_equal(readers[0].get_tensor(key), readers[1].get_tensor(key), key)


# ----------------------------------------------------------------------------- strategies
def test_mirrored_strategy_on_two_logical_cpus(tmp_path, caplog):
  # --nojit_compile keeps this fast; XLA per replica: tests/test_distributed.py.
  with caplog.at_level(logging.INFO, logger='absl'):
    _main(f'--workdir={tmp_path}', '--strategy=mirrored', '--num_cpu_devices=2', '--verbosity=0',
          '--epochs=1', '--steps_per_epoch=2', '--eval_batches=1', '--mode=train',
          '--nojit_compile')
  assert '2 replica(s), jit_compile=False' in caplog.text
  prefix = os.path.join(tmp_path, 'checkpoints', 'ckpt-2')
  assert _ckpt_value(prefix, 'optimizer/_iterations') == 2
  with open(os.path.join(tmp_path, 'best', 'best.json'), encoding='utf-8') as f:
    assert np.isfinite(json.load(f)['test_bits_per_dim'])


def test_sigkill_mid_epoch_loses_only_the_steps_since_the_last_checkpoint(tmp_path, caplog):
  args = [f'--workdir={tmp_path}', '--epochs=1', '--steps_per_epoch=400',
          '--checkpoint_every_steps=5', '--nojit_compile', '--mode=train']
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  process = subprocess.Popen([sys.executable, '-m', 'train.main', f'--flagfile={TINY}', *args],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  def committed():
    # The step the checkpoint state names (an index file alone may still be mid-save).
    prefix = tf.train.latest_checkpoint(os.path.join(tmp_path, 'checkpoints'))
    return checkpoint_files.step_of(prefix) if prefix else -1

  try:
    deadline = time.time() + 600
    while committed() < 10 and time.time() < deadline:
      time.sleep(0.5)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  latest = committed()
  assert latest >= 10 and latest % 5 == 0
  with caplog.at_level(logging.INFO, logger='absl'):
    _main(f'--workdir={tmp_path}', '--epochs=0', '--steps_per_epoch=400', '--mode=train',
          '--verbosity=0')
  assert f'resumed from {tmp_path}/checkpoints/ckpt-{latest}' in caplog.text


@pytest.mark.parametrize('name', sorted(os.path.basename(p)[:-len('.flags')] for p in
                                        glob.glob(os.path.join(ROOT, 'configs', '*.flags'))))
def test_every_flagfile_parses_into_a_valid_model_config(name):
  """Each configs/*.flags parses with the program's flags and gives a valid FlowConfig (the
  model's own checks included), without building the model."""
  _, config = flagfiles.parse(os.path.join(ROOT, 'configs', name + '.flags'))
  if config.model == 'denseflow':
    assert denseflow.parameter_count(config)['total'] > 0   # validates the block structure


# ------------------------------------------------------------------- progress and BN refresh
class _Clock:
  def __init__(self):
    self.now = 100.

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_redraws_on_a_terminal_and_logs_sparsely_elsewhere(monkeypatch):
  from train import progress  # pylint: disable=import-outside-toplevel
  clock = _Clock()
  terminal = _Terminal()
  bar = progress.Progress('eval', 500, 'images', stream=terminal, clock=clock)
  clock.now += 30.  # the first batch: tracing
  bar.update(100)
  for _ in range(4):
    clock.now += 10.
    bar.update(100, bound=1.91234)
    if bar.done == 300:
      assert 'ETA 20s' in bar.line() and '10 images/s' in bar.line()  # first batch left out
  bar.close()
  drawn = terminal.getvalue()
  assert drawn.count('\r') == 6 and drawn.endswith('\n') and '500/500 images' in drawn
  assert '[########################]' in drawn and 'bound 1.912' in drawn and 'in 1:10' in drawn

  log = io.StringIO()  # not a terminal: one line a minute at most, and one at the end
  lines = []
  monkeypatch.setattr(progress.logging, 'info', lambda fmt, *args: lines.append(fmt % args))
  plain = progress.Progress('samples', 1000, 'images', stream=log, log_seconds=60., clock=clock)
  for _ in range(100):
    clock.now += 2.
    plain.update(10)
  plain.close()
  assert log.getvalue() == '' and plain.lines_logged == 4  # at 60, 120, 180 s and the end
  assert len(lines) == 4 and lines[-1].startswith('samples  1000/1000 images  5 images/s')
  assert '\r' not in ''.join(lines)
  silent = progress.Progress('export', 3, 'stages', show=False, stream=terminal, clock=clock)
  silent.update(3)
  silent.close()
  assert terminal.getvalue() == drawn
  assert progress.format_seconds(3725) == '1:02:05'


@pytest.fixture(scope='module')
def tiny_denseflow():
  """A tiny DenseFlow (batch norm in every coupling network; the first block's units are 3
  steps each, a loop over stacked weights), ActNorm initialised, output convs perturbed; its
  running statistics are still the initial ones (0 and 1), far from any batch's. Float32
  networks: the traced and eager passes are compared to 1e-5."""
  config = tfflows.FlowConfig(model='denseflow', image_shape=(8, 8, 1), block_conf=(2, 1),
                              layers_conf=(3, 1), layer_mid_channels=(8, 8), growth_rate=2,
                              dense_layers=1, dense_growth=4, split_prior='standard',
                              dequantization='uniform', conditioner_precision='float32')
  model = tfflows.build_model(config)
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1)).astype(np.uint8)
  model(tf.cast(images[:8], tf.float32), training=True, seed=tf.constant([5, 5]))
  rng = np.random.default_rng(1)
  outputs = [v for v in model.trainable_variables if 'conv_out' in v.path]
  assert outputs
  for v in outputs:  # zero-initialised: without this the couplings ignore their networks
    v.assign(0.05 * rng.standard_normal(v.shape).astype(np.float32))
  return model, [images[:8], images[8:]]


def test_batch_norm_refresh_sets_the_batch_statistics_and_nothing_else(tiny_denseflow):
  model, (first, second) = tiny_denseflow
  statistics = callbacks.batch_norm_statistics(model)
  layers = [layer for layer, _, _ in statistics]
  assert len(layers) == 3 and all(layer.momentum == 0.9 for layer in layers)
  seed = tf.constant([0, 0])
  x = tf.cast(first, tf.float32)
  weights = [np.array(v) for v in model.trainable_variables]
  seed_state = np.array(model.seed_generator.state)
  assert not np.allclose(model(x, training=False, seed=seed), model(x, training=True, seed=seed))

  def stats():
    return [np.array(statistics[-1][1]), np.array(statistics[-1][2])]
  assert callbacks.refresh_batch_norm(model, [first]) == 1
  # Inference now normalises with exactly the statistics of that batch: the same numbers.
  np.testing.assert_allclose(model(x, training=False, seed=seed),
                             model(x, training=True, seed=seed), rtol=1e-5)
  one = stats()
  callbacks.refresh_batch_norm(model, [second], seed=1)  # batch 1 of the next refresh
  two = stats()
  assert callbacks.refresh_batch_norm(model, [first, second]) == 2
  average = [(a + b) / 2 for a, b in zip(one, two)]
  for got, want in zip(stats(), average):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # their average
  assert not np.allclose(one[1], two[1])
  # Trainable weights, the model's random state and the layers' momenta are untouched.
  for before, after in zip(weights, model.trainable_variables):
    np.testing.assert_array_equal(before, np.array(after))
  np.testing.assert_array_equal(seed_state, np.array(model.seed_generator.state))
  assert all(layer.momentum == 0.9 for layer in layers)
  # No batches change nothing; a model without batch norm is left alone.
  assert callbacks.refresh_batch_norm(model, []) == 0
  for got, want in zip(stats(), average):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  glow = tfflows.build_model(tfflows.FlowConfig(model='glow', image_shape=(8, 8, 1),
                                                num_levels=2, steps_per_level=1, width=4))
  assert callbacks.refresh_batch_norm(glow, [first]) == 0


def test_batch_norm_refresh_runs_before_each_test_evaluation(tiny_denseflow):
  """Keras calls on_test_begin before fit's per-epoch validation; the callback refreshes there
  with a traced forward pass (one trace, reused), or not at all with 0 batches."""
  model, (first, second) = tiny_denseflow
  refresh = callbacks.BatchNormRefresh(tf.data.Dataset.from_tensor_slices(second).batch(8),
                                       num_batches=1, seed=3)
  refresh.set_model(model)
  refresh.on_test_begin()
  eager = tfflows.build_model(model.config)
  eager.set_weights(model.get_weights())
  assert callbacks.refresh_batch_norm(eager, [second], seed=3) == 1
  for (_, _, a), (_, _, b) in zip(callbacks.batch_norm_statistics(model),
                                  callbacks.batch_norm_statistics(eager)):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5)
  refresh.on_test_begin()
  assert refresh.refreshes == 2
  assert refresh._forward.experimental_get_tracing_count() == 1  # pylint: disable=protected-access
  off = callbacks.BatchNormRefresh(tf.data.Dataset.from_tensor_slices(first).batch(8), 0)
  off.set_model(model)
  off.on_test_begin()
  assert off.refreshes == 0 and off._forward is None  # pylint: disable=protected-access


# ---------------------------------------- issue 13: nothing lost, nothing silent, one line
def _snapshot(directory):
  """{relative path: bytes} of every file under directory."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def _eval_results(workdir):
  """The eval result files of a workdir (one place to follow the eval file's name)."""
  return sorted(glob.glob(os.path.join(workdir, 'eval*.json')) +
                glob.glob(os.path.join(workdir, 'eval', '*.json')))


def _stops(*args):
  """Runs the program in this process; returns the one line it ends with (exit status 1)."""
  with pytest.raises(SystemExit) as stopped:
    _main(*args)
  line = stopped.value.code
  assert isinstance(line, str), line   # sys.exit(message): status 1, the message on stderr
  assert line.startswith('train.main: error: ') and '\n' not in line, line
  return line


def test_unusable_checkpoint_state_stops_before_anything_is_overwritten(trained, tmp_path):
  """Issue 13.1: garbage in (or no) checkpoints/checkpoint beside ckpt-3 and ckpt-4: the rerun
  refuses, naming the state file, and every file stays as it was."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('eval*', 'samples', 'export'))
  state = os.path.join(workdir, 'checkpoints', 'checkpoint')
  for damage in ('garbage', 'missing'):
    if damage == 'garbage':
      with open(state, 'w', encoding='utf-8') as f:
        f.write('garbage\n')
    else:
      os.remove(state)
    before = _snapshot(workdir)
    for mode in ('train', 'eval'):
      line = _stops(f'--workdir={workdir}', '--epochs=2', f'--mode={mode}')
      assert f'checkpoint state {state} is unusable' in line and 'ckpt-3, ckpt-4' in line
    assert _snapshot(workdir) == before


@pytest.mark.parametrize('args, expected', [
    (['--num_levels=6'], 'model flags: 6 levels need H and W divisible by 64'),
    (['--width=0'], 'width=0 must be a positive integer'),
    (['--steps_per_level=0'], 'steps_per_level=0 must be a positive integer'),
    (['--temperatures=1,inf'], '--temperatures=1,inf: every temperature must be a finite'),
    (['--mode=export', '--export_dir={file}'], '--export_dir={file} is a file, not a directory'),
    (['--workdir={file}'], '--workdir={file} is a file, not a directory'),
])
def test_a_failed_start_is_one_line_and_leaves_nothing(tmp_path, args, expected):
  """Issue 13.4 and 13.5: a start that fails (before or after building the model) ends with
  one line naming the flag, and writes nothing: the corrected command is then accepted."""
  file = tmp_path / 'a_file'
  file.write_text('not a directory')
  workdir = tmp_path / 'run'
  args = [a.format(file=file) for a in args]
  line = _stops(f'--workdir={workdir}', '--epochs=1', *args)
  assert expected.format(file=file) in line
  assert sorted(os.listdir(tmp_path)) == ['a_file']   # the workdir was not even created
  assert Run.from_flags(_parse(f'--workdir={workdir}'), modes.MODES).modes == ['train']


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def test_damaged_files_and_other_architectures_are_one_line_naming_them(trained, tmp_path):
  """Issue 13.5: a truncated checkpoint .data or .index, a truncated config.json, --init_from a
  run of another width: one line naming the file or flag; nothing in the workdir changes."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('eval*', 'samples', 'export'))
  latest = os.path.join(workdir, 'checkpoints', 'ckpt-4')
  cases = [(latest + '.data-00000-of-00001', f'checkpoint {latest} cannot be read ('),
           (latest + '.index', f'checkpoint {latest} cannot be read ('),
           (os.path.join(workdir, 'config.json'), 'config.json cannot be read as the JSON')]
  for path, expected in cases:
    with open(path, 'rb') as f:
      intact = f.read()
    _truncate(path)
    before = _snapshot(workdir)
    for mode in ('train', 'eval'):
      assert expected in _stops(f'--workdir={workdir}', '--epochs=2', f'--mode={mode}')
    assert _snapshot(workdir) == before
    with open(path, 'wb') as f:
      f.write(intact)
  # --init_from a run of another width (the trained run has width 8).
  other = str(tmp_path / 'other')
  line = _stops(f'--workdir={other}', f'--init_from={trained}', '--width=4', '--epochs=1')
  assert f'--init_from={trained}: checkpoint {trained}/checkpoints/ckpt-4 holds model ' in line
  assert 'with shape' in line and '--width=4 (there: 8)' in line
  assert not os.path.exists(other)


@pytest.mark.slow
def test_cli_failure_is_one_line_without_a_traceback(tmp_path):
  """Issue 13.5 end to end: exit status 1 and the error as the last line of stderr, no
  traceback, nothing written."""
  result = _cli(f'--workdir={tmp_path / "run"}', '--num_levels=6', '--epochs=1')
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'train.main: error: model flags: 6 levels need H and W divisible by 64; image_shape is '
      '(32, 32, 1).')
  assert not os.path.exists(tmp_path / 'run')


NOBODY = 65534


@contextlib.contextmanager
def _without_root_privileges():
  """Runs the block as user nobody if this process is root: root writes through any mode bits,
  so a chmod-ed directory is read-only only for an unprivileged user. The saved user id stays
  0, so the effective one is restored afterwards."""
  if os.geteuid() != 0:
    yield
    return
  os.seteuid(NOBODY)
  try:
    yield
  finally:
    os.seteuid(0)


def test_read_only_workdir_and_export_dir_are_refused_before_any_compute(trained):
  """Issue 13.6 with a real read-only directory (chmod 555, as a user without root
  privileges): train, eval and export stop at start-up with one line naming the directory."""
  base = tempfile.mkdtemp()   # under /tmp, which user nobody can reach (0755 below)
  try:
    os.chmod(base, 0o755)
    workdir, exports = os.path.join(base, 'run'), os.path.join(base, 'exports')
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('eval*', 'samples', 'export'))
    os.mkdir(exports)
    if os.geteuid() == 0:   # the run belongs to the user that runs the program
      for root, dirs, files in os.walk(base):
        for name in dirs + files:
          os.chown(os.path.join(root, name), NOBODY, NOBODY)
    with _without_root_privileges():
      os.chmod(workdir, 0o555)
      for mode in ('train', 'eval'):
        line = _stops(f'--workdir={workdir}', '--epochs=2', f'--mode={mode}')
        assert line == (f'train.main: error: cannot write {workdir}: Permission denied '
                        f'(--workdir={workdir}).')
      os.chmod(workdir, 0o755)
      os.chmod(exports, 0o555)
      line = _stops(f'--workdir={workdir}', '--mode=export', f'--export_dir={exports}')
      assert line == (f'train.main: error: cannot write {exports}: Permission denied '
                      f'(--export_dir={exports}).')
      os.chmod(exports, 0o755)
    assert not _eval_results(workdir) and os.listdir(exports) == []
  finally:
    shutil.rmtree(base, ignore_errors=True)


def test_skipping_nonfinite_steps_ends_with_an_error_not_a_nan_model(tmp_path):
  """Issue 13.3: --on_nonfinite=skip at a learning rate whose first update gives a model
  that returns NaN: after --max_nonfinite_skips steps in a row it stops (exit status 1), and no
  checkpoint of that model exists."""
  workdir = str(tmp_path)
  line = _stops(f'--workdir={workdir}', '--on_nonfinite=skip', '--max_nonfinite_skips=3',
                '--learning_rate=1e30', '--warmup_steps=0', '--checkpoint_every_steps=0',
                '--steps_per_epoch=8', '--epochs=1', '--nojit_compile')
  assert '3 steps in a row (steps 2 to 4) had a non-finite loss' in line
  assert 'there is no checkpoint, so rerunning starts afresh' in line
  assert not _steps(workdir) and not _steps(workdir, 'best')


def test_eval_sample_and_export_of_a_model_that_gives_nan_fail_and_write_nothing(trained,
                                                                                tmp_path):
  """Issue 10.4: a checkpoint whose model has finite weights but gives NaN (written before
  checkpoints were checked): eval and sample each stop with a message, and no JSON or PNG is
  written. (Export's refusal of such a model: tests/test_export.py.)"""
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns('eval*', 'samples', 'export'))
  run = Run.from_flags(_parse(f'--workdir={workdir}', '--mode=eval'), modes.MODES)
  model, _ = run.load_model()
  for w in flow_checks.first_level_networks(model):
    w.assign(tf.fill(w.shape, tf.constant(1e30, w.dtype)))
  poisoned = os.path.join(workdir, 'checkpoints', 'ckpt-5')
  checkpoint_contents.model_checkpoint(model).write(poisoned)
  checkpoint_files.write_state(os.path.join(workdir, 'checkpoints'), poisoned)
  before = _snapshot(workdir)
  for mode, expected in (('eval', f'under the model of {poisoned}: the model gives NaN or Inf'),
                         ('sample', 'model.sample(n=4, temperature=1.0): 4 of 4 images hold NaN')):
    assert expected in _stops(f'--workdir={workdir}', f'--mode={mode}')
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  """Issue 13.6 on a real full file system: a 200 KiB tmpfs (needs root and the right to
  mount; skipped otherwise). Training stops at the first checkpoint that does not fit, with one
  line; no partial file is left and every checkpoint there reads completely; eval on the then
  full disk is refused before evaluating."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', str(disk)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr.strip()}')
  try:
    workdir = str(disk / 'run')
    line = _stops(f'--workdir={workdir}', '--epochs=4', '--nojit_compile')
    assert re.search(r'cannot write \S+/ckpt-\d+: No space left on device', line), line
    for sub in ('checkpoints', 'best'):
      names = os.listdir(os.path.join(workdir, sub)) if os.path.isdir(
          os.path.join(workdir, sub)) else []
      assert not [n for n in names if '_temp' in n or '.tmp' in n], names
      for step in _steps(workdir, sub):
        reader = tf.train.load_checkpoint(os.path.join(workdir, sub, f'ckpt-{step}'))
        for key in reader.get_variable_to_shape_map():
          reader.get_tensor(key)
    latest = checkpoint_files.committed(os.path.join(workdir, 'checkpoints'))
    assert latest is not None
    fd = os.open(disk / 'fill', os.O_WRONLY | os.O_CREAT)   # fill the rest of the disk
    with contextlib.suppress(OSError):
      while os.write(fd, b'\0' * 4096):
        pass
    os.close(fd)
    line = _stops(f'--workdir={workdir}', '--mode=eval')
    assert line == (f'train.main: error: cannot write {workdir}: No space left on device '
                    f'(--workdir={workdir}).')
  finally:
    subprocess.run(['umount', '--lazy', str(disk)], check=False)   # event files may be open
