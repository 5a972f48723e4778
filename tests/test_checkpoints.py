"""The workdir (train/checkpoints.py and the checkpoint_files, checkpoint_contents,
model_vetting and disk_space modules it uses): config.json describes the workdir's model,
nothing committed is lost, nothing half-written is used, nothing poisoned is saved, a full disk
is one clear error.

The tests build a tiny Glow (8x8x1) and a Checkpointer on a temporary workdir; no training."""

import errno
import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app

import tfflows
from tests import flow_checks
from tfflows import atomic
from train import checkpoint_contents
from train import checkpoint_files
from train import checkpoints
from train import disk_space
from train import flags as train_flags
from train import model_vetting

TINY_GLOW = dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=1, width=4)


class Killed(BaseException):
  """Stands for SIGKILL at a chosen moment: nothing after it runs (no except clause sees it)."""


def _images(n, seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n, 8, 8, 1)).astype(np.uint8)


def _model():
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  model.compile(keras.optimizers.Adamax(1e-3))
  model.optimizer.build(model.trainable_variables)
  model.initialize(_images(8))  # ActNorm's initialisation
  return model


@pytest.fixture(scope='module')
def model():
  return _model()


def _checkpointer(workdir, model, **kwargs):
  return checkpoints.Checkpointer(str(workdir), model, model.optimizer, keep=3, **kwargs)


def _names(directory):
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _read_all(prefix):
  """Reads every tensor of a checkpoint (checksums included): raises if any is damaged."""
  reader = tf.train.load_checkpoint(prefix)
  for key in reader.get_variable_to_shape_map():
    reader.get_tensor(key)


def _poison(model):
  """Finite weights whose model gives NaN: the first coupling network's weights at 1e30."""
  net = flow_checks.first_level_networks(model)
  for w in net:
    w.assign(tf.fill(w.shape, tf.constant(1e30, w.dtype)))


# ------------------------------------------------------------ config.json and flags.txt
def test_config_json_is_written_once_and_the_flags_must_describe_it(tmp_path):
  config = tfflows.FlowConfig(**TINY_GLOW)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flag_values = train_flags.FLAGS
  flag_values.unparse_flags()
  flag_values(['train.main', f'--flagfile={root}/configs/tiny.flags', f'--workdir={tmp_path}'])
  checkpoints.check_config(str(tmp_path), config)   # no config.json yet: any model
  checkpoints.write_config(str(tmp_path), config, flag_values)
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    assert tfflows.FlowConfig.from_dict(json.load(f)) == config
  assert f'--workdir={tmp_path}' in (tmp_path / 'flags.txt').read_text().splitlines()
  checkpoints.check_config(str(tmp_path), config)
  with pytest.raises(app.UsageError, match=r'the model flags differ from the model trained in '
                                           r'.*: --width=8 \(workdir: 4\)\. Use the flags'):
    checkpoints.check_config(str(tmp_path), config.replace(width=8))
  checkpoints.write_config(str(tmp_path), config.replace(width=8), flag_values)  # not rewritten
  checkpoints.check_config(str(tmp_path), config)
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(app.UsageError, match='config.json cannot be read as the JSON'):
    checkpoints.check_config(str(tmp_path), config)


@pytest.mark.parametrize('retired', ['--step_loop', '--nostep_loop'])
def test_a_flags_txt_of_an_earlier_version_still_parses(tmp_path, retired):
  """flags.txt files written while step_loop was a model flag hold --step_loop or --nostep_loop:
  rerunning them still parses (the flag is retired and ignored), and a new flags.txt leaves it
  out."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  old = tmp_path / 'old_flags.txt'
  old.write_text(f'--flagfile={root}/configs/tiny.flags\n--workdir={tmp_path}\n{retired}\n')
  flag_values = train_flags.FLAGS
  flag_values.unparse_flags()
  flag_values(['train.main', f'--flagfile={old}'])
  assert 'step_loop' not in {f.name for f in train_flags.program_flags(flag_values)}
  assert 'step_loop' not in train_flags.flagfile_text(flag_values)


# ------------------------------------------------------------------ item 1: the state file
@pytest.mark.parametrize('damage', ['garbage', 'deleted', 'names a missing checkpoint'])
def test_checkpoints_without_a_usable_state_are_refused_not_overwritten(model, tmp_path, damage):
  saver = _checkpointer(tmp_path, model)
  saver.save(4, 1)
  saver.save(8, 2)
  state = tmp_path / 'checkpoints' / 'checkpoint'
  if damage == 'garbage':
    state.write_text('garbage\n')
  elif damage == 'deleted':
    state.unlink()
  else:
    state.write_text('model_checkpoint_path: "ckpt-12"\n')
  before = {p: open(p, 'rb').read() for p in glob.glob(str(tmp_path / '**'), recursive=True)
            if os.path.isfile(p)}
  for call in (lambda: _checkpointer(tmp_path, model),
               lambda: checkpoint_files.resolve(str(tmp_path), 'latest'),
               lambda: checkpoint_files.find_checkpoint(str(tmp_path))):
    with pytest.raises(checkpoint_files.CheckpointError) as error:
      call()
    message = str(error.value)
    assert str(state) in message and 'ckpt-4, ckpt-8' in message and 'ckpt-8' in message
    assert '\n' not in message
  after = {p: open(p, 'rb').read() for p in glob.glob(str(tmp_path / '**'), recursive=True)
           if os.path.isfile(p)}
  assert after == before   # nothing deleted, nothing overwritten, nothing written
  # The message says how to resume from the newest: doing so works.
  state.write_text('model_checkpoint_path: "ckpt-8"\n')
  assert _checkpointer(tmp_path, model).restore_latest() == str(tmp_path / 'checkpoints' /
                                                                'ckpt-8')


def test_a_state_file_without_checkpoints_is_a_fresh_start(model, tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  (tmp_path / 'checkpoints' / 'checkpoint').write_text('garbage\n')
  assert _checkpointer(tmp_path, model).restore_latest() is None


# ----------------------------------------------------------- item 2: names, leftovers, best
def test_a_save_never_writes_beside_files_of_the_same_name(model, tmp_path, monkeypatch):
  """A resumed run saves again under a name a killed run left uncommitted on disk: the old
  files are gone before the new save starts (an old index beside new data cannot happen)."""
  saver = _checkpointer(tmp_path, model)
  saver.save(3, 0)
  saver.save(4, 1)
  (tmp_path / 'checkpoints' / 'checkpoint').write_text(
      'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-3"\n')
  resumed = _checkpointer(tmp_path, model)
  assert resumed.restore_latest().endswith('ckpt-3')
  seen = []
  real_save = tf.train.CheckpointManager.save

  def spy(manager, checkpoint_number=None, **kwargs):
    prefix = os.path.join(manager.directory, f'ckpt-{checkpoint_number}')
    seen.append(sorted(glob.glob(prefix + '.*') + glob.glob(prefix + '_temp')))
    return real_save(manager, checkpoint_number=checkpoint_number, **kwargs)

  monkeypatch.setattr(tf.train.CheckpointManager, 'save', spy)
  prefix = resumed.save(4, 1)
  assert seen == [[]]
  _read_all(prefix)
  assert checkpoint_files.committed(str(tmp_path / 'checkpoints')) == prefix


def test_what_a_killed_save_leaves_is_removed_at_start(model, tmp_path):
  saver = _checkpointer(tmp_path, model)
  saver.save(1, 0)
  assert saver.save_best(1, 0, 5.0)
  ckpt, best = tmp_path / 'checkpoints', tmp_path / 'best'
  leftovers = [ckpt / 'checkpoint.tmp0123abcd', ckpt / 'ckpt-7_temp' / 'part-00000-of-00001',
               ckpt / 'ckpt-7.data-00000-of-00001', best / 'ckpt-7_temp' / 'part',
               best / '.best.json.x1y2.tmp', ckpt / '.checkpoint.a1b2.tmp']
  for path in leftovers:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'partial')
  _checkpointer(tmp_path, model)
  assert _names(ckpt) == ['checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index']
  assert _names(best) == ['best.json', 'checkpoint', 'ckpt-1.data-00000-of-00001',
                          'ckpt-1.index']


def test_best_json_and_best_dir_agree_whenever_a_save_is_killed(model, tmp_path, monkeypatch):
  saver = _checkpointer(tmp_path, model)
  assert saver.save_best(1, 0, 5.0)
  best = tmp_path / 'best'

  def killed(*args, **kwargs):
    raise Killed()

  # Killed after the checkpoint was written, before best.json names it.
  monkeypatch.setattr(atomic, 'write_json', killed)
  with pytest.raises(Killed):
    saver.save_best(2, 0, 4.0)
  monkeypatch.undo()
  assert checkpoint_files.resolve(str(tmp_path), 'best') == str(best / 'ckpt-1')
  saver = _checkpointer(tmp_path, model)
  assert checkpoint_files.checkpoint_prefixes(str(best)) == [str(best / 'ckpt-1')]
  assert checkpoint_files.read_state(str(best)) == str(best / 'ckpt-1')
  # Killed after best.json names the new checkpoint, before best/checkpoint does.
  monkeypatch.setattr(checkpoint_files, 'write_state', killed)
  with pytest.raises(Killed):
    saver.save_best(3, 0, 3.0)
  monkeypatch.undo()
  assert json.loads((best / 'best.json').read_text())['checkpoint'] == 'ckpt-3'
  assert checkpoint_files.resolve(str(tmp_path), 'best') == str(best / 'ckpt-3')   # readers agree
  saver = _checkpointer(tmp_path, model)
  assert checkpoint_files.read_state(str(best)) == str(best / 'ckpt-3')
  assert checkpoint_files.checkpoint_prefixes(str(best)) == [str(best / 'ckpt-3')]
  assert saver.best == 3.0
  _read_all(str(best / 'ckpt-3'))


def test_unreadable_best_json_beside_checkpoints_is_refused(model, tmp_path):
  saver = _checkpointer(tmp_path, model)
  assert saver.save_best(1, 0, 5.0)
  (tmp_path / 'best' / 'best.json').write_text('{"test_bits_per_dim": 5.')
  with pytest.raises(checkpoint_files.CheckpointError, match='best.json cannot be read'):
    _checkpointer(tmp_path, model)
  assert checkpoint_files.checkpoint_prefixes(str(tmp_path / 'best'))


# ------------------------------------------------------------ item 3: no poisoned checkpoint
def test_a_model_that_gives_nan_is_never_saved(tmp_path):
  model = _model()
  saver = _checkpointer(tmp_path, model, probe_images=_images(4))
  saver.save(1, 0)
  _poison(model)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in model.variables)
  with pytest.raises(model_vetting.PoisonedWeightsError,
                     match=r'after step 2, the model gives a NaN or Inf log-likelihood for 4 of 4 '
                           r'probe test images although its weights are finite: no checkpoint is '
                           r'written; the last good checkpoint is .*ckpt-1; rerunning resumes '
                           r'from it\.'):
    saver.save(2, 0)
  with pytest.raises(model_vetting.PoisonedWeightsError):
    saver.save_best(2, 0, 1.0)
  assert checkpoint_files.checkpoint_prefixes(str(tmp_path / 'checkpoints')) == [
      str(tmp_path / 'checkpoints' / 'ckpt-1')]
  assert not os.path.exists(tmp_path / 'best')
  # Restored, such a model (a checkpoint written before this check) is refused as a start.
  checkpoint_contents.model_checkpoint(model).write(str(tmp_path / 'checkpoints' / 'ckpt-2'))
  with pytest.raises(model_vetting.PoisonedWeightsError, match='ckpt-2 is not a good state'):
    saver.check_start('resumed from ckpt-2', str(tmp_path / 'checkpoints' / 'ckpt-2'))


def test_nan_weights_are_never_saved(tmp_path):
  model = _model()
  saver = _checkpointer(tmp_path, model)
  model.trainable_variables[0].assign(np.full(model.trainable_variables[0].shape, np.nan))
  with pytest.raises(model_vetting.PoisonedWeightsError, match='holds NaN or Inf'):
    saver.save(1, 0)
  assert not checkpoint_files.checkpoint_prefixes(str(tmp_path / 'checkpoints'))


def test_skipping_stops_after_a_bounded_number_of_steps_in_a_row(model):
  """The guard reads the model's count of non-finite steps (train_step adds 1 for each)."""
  guard = model_vetting.NonFiniteGuard('skip', max_skips=3, last_good=lambda: '/w/ckpt-8')
  guard.set_model(model)
  guard.on_train_begin()
  for skipped in (1, 1, 0, 1, 1):   # a finite step resets the count
    model.nonfinite_tracker.update_state(float(skipped))
    guard.on_train_batch_end(0, {'loss': np.nan})
  assert guard.skipped == 4 and guard.consecutive == 2
  model.nonfinite_tracker.update_state(1.)
  with pytest.raises(model_vetting.NonFiniteLossError,
                     match=r'3 steps in a row .* --max_nonfinite_skips=3 .*the last good '
                           r'checkpoint is /w/ckpt-8; rerunning resumes from it'):
    guard.on_train_batch_end(0, {})
  assert model.stop_training


# -------------------------------------------------------------------- item 6: full disks
def test_a_full_disk_mid_save_leaves_nothing_and_keeps_the_last_checkpoint(model, tmp_path,
                                                                          monkeypatch):
  saver = _checkpointer(tmp_path, model)
  first = saver.save(1, 0)
  ckpt = tmp_path / 'checkpoints'

  def full_disk(manager, checkpoint_number=None, **kwargs):
    """What TensorFlow leaves when the disk fills during SaveV2: a partial shard in the
    _temp directory, a partial data file, a temporary state file."""
    temp = ckpt / f'ckpt-{checkpoint_number}_temp'
    temp.mkdir()
    (temp / 'part-00000-of-00001.data-00000-of-00001').write_bytes(b'\0' * 100)
    (ckpt / f'ckpt-{checkpoint_number}.data-00000-of-00001').write_bytes(b'\0' * 100)
    (ckpt / 'checkpoint.tmp9f8e7d').write_bytes(b'')
    raise tf.errors.ResourceExhaustedError(
        None, None, f'{temp}/part-00000-of-00001.data-00000-of-00001.tempstate4567; No space '
        'left on device [Op:SaveV2]')

  monkeypatch.setattr(tf.train.CheckpointManager, 'save', full_disk)
  with pytest.raises(atomic.WriteError) as error:
    saver.save(2, 0)
  assert str(error.value) == (f'cannot write {ckpt}/ckpt-2: No space left on device (nothing of '
                              f'it is left; the last checkpoint, {first}, is kept)')
  assert error.value.errno == errno.ENOSPC
  assert _names(ckpt) == ['checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index']
  assert checkpoint_files.committed(str(ckpt)) == first
  _read_all(first)


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(model, tmp_path,
                                                                         monkeypatch):
  import shutil  # pylint: disable=import-outside-toplevel
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: usage._replace(free=4096))
  needed = disk_space.checkpoint_bytes(list(model.variables) + list(model.optimizer.variables))
  assert needed > 4096
  with pytest.raises(atomic.WriteError, match=r'cannot write .*: No space left on device: '
                                              r'4\.0 KiB free, a checkpoint of this model needs'):
    _checkpointer(tmp_path / 'run', model)
  assert not os.path.exists(tmp_path / 'run')
