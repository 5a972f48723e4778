"""The workdir: what a run writes there, in which order, how a start checks it, and how a
start repairs what a kill interrupted.

    WORKDIR/config.json                                            the model (written once)
    WORKDIR/flags.txt                                              the last training flags
    WORKDIR/checkpoints/ckpt-<step>.{index,data-*}, checkpoint     periodic, newest N
    WORKDIR/best/ckpt-<step>.*, checkpoint, best.json              best test bits/dim so far
    WORKDIR/samples, export, tensorboard                           what the modes write

The names and commit records are those of ``train.checkpoint_files``; what a checkpoint holds
is ``train.checkpoint_contents``; ``train.model_vetting`` says whether a model is fit to be
saved; ``train.disk_space`` checks the room for one. The Checkpointer keeps these rules:

- A start checks before it writes anything: ``check_config`` (config.json, if there, must be
  readable and describe the model of the flags; the fields of
  ``tfflows.config.RUNTIME_FIELDS`` may differ), a usable state file (``committed``), room
  for one checkpoint, and a model that gives finite log-likelihoods (``check_start``).
- Then ``write_config`` writes config.json (once: it is the model of the workdir) and
  flags.txt (every training invocation: a flagfile that reproduces it), each atomically.
- The state file ``checkpoints/checkpoint`` is the commit record of the periodic checkpoints:
  TensorFlow writes a checkpoint's data and index first, and the CheckpointManager then
  rewrites the state file by write-to-temp-and-rename, so a process killed mid-save leaves the
  state naming the previous checkpoint, which is what a rerun restores. When ``checkpoints/``
  holds checkpoints but its state file is missing, unreadable or names a checkpoint whose files
  are gone, nothing is resumed, started or deleted (``CheckpointError``).
- A name is never saved over: files of ``ckpt-N`` that the state does not commit (left by a
  killed run, newer than the checkpoint a rerun resumed from) are deleted before ``ckpt-N`` is
  saved again, so no index of one save can end up beside the data of another.
- ``best.json`` is the commit record of ``best/``: the best checkpoint is written, then
  best.json naming it (atomically), then best/checkpoint, then the previous best is deleted.
  At start-up best/checkpoint is rewritten from best.json if a kill came in between, and
  checkpoints best.json does not name are deleted, so the two never disagree.
- What a killed save leaves (``checkpoint.tmp*``, ``ckpt-N_temp/``, data files without an
  index, temporary JSON files) is deleted at start-up, in ``checkpoints/`` and ``best/``.
- A checkpoint is written only from a good model (``model_vetting``); otherwise
  ``PoisonedWeightsError`` names the last good checkpoint.
- A failed write (full disk, read-only directory) raises ``atomic.WriteError`` ("cannot write
  PATH: No space left on device"), deletes the partial files and keeps the last checkpoint.
"""

import glob
import hashlib
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import app
from absl import logging

import tfflows
from tfflows import atomic
from train import checkpoint_contents
from train import checkpoint_files as files
from train import disk_space
from train import flags as train_flags
from train.checkpoint_contents import MODEL_VARIABLES
from train.checkpoint_files import CheckpointError
from train import model_vetting
from train.model_vetting import PoisonedWeightsError

CONFIG_JSON = 'config.json'
FLAGS_TXT = 'flags.txt'
# Subdirectories the modes write to: each that exists must be writable too.
WORKDIR_SUBDIRS = (files.CHECKPOINTS, files.BEST, 'samples', 'export', 'tensorboard')


# ------------------------------------------------------------------- config.json, flags.txt
def check_config(workdir, config):
  """The model flags (FlowConfig ``config``) must describe the model already in the workdir,
  if any; app.UsageError naming the flags that differ, or the unreadable config.json."""
  path = os.path.join(workdir, CONFIG_JSON)
  if not os.path.exists(path):
    return
  stored = _read_config(path)
  if stored is None:
    raise app.UsageError(
        f'{path} cannot be read as the JSON of a model config: it holds the model of this '
        'workdir. Restore it, or delete it to have this run write it anew from the model flags '
        '(a resumed run still checks them against the checkpoint).')
  differ = _config_differences(stored, config)
  if differ:
    raise app.UsageError(f'the model flags differ from the model trained in {workdir} '
                         f'({CONFIG_JSON}): {"; ".join(differ)}. Use the flags it was trained '
                         'with, or a new --workdir.')


def write_config(workdir, config, flag_values):
  """Writes config.json (the model) once and flags.txt (this invocation's program flags, a
  flagfile that reproduces the run), each atomically: a failing run never leaves a truncated
  one."""
  path = os.path.join(workdir, CONFIG_JSON)
  if not os.path.exists(path):
    atomic.write_json(path, config.to_dict())
  path = os.path.join(workdir, FLAGS_TXT)
  atomic.write_text(path, train_flags.flagfile_text(flag_values, header=(
      'The flags of the last training invocation of this run; to rerun it (resume):\n'
      f'  python -m train.main --flagfile={path}')))


def config_difference_note(init_from, config):
  """' (... config.json: --width=16 there)' when the run ``init_from`` names (a workdir,
  WORKDIR/best or a checkpoint prefix) has a config.json whose model differs from ``config``;
  '' otherwise."""
  path = os.path.abspath(init_from)
  for directory in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    stored = _read_config(os.path.join(directory, CONFIG_JSON))
    if stored is not None:
      differ = _config_differences(stored, config, where='there')
      return (f' ({os.path.join(directory, CONFIG_JSON)} differs from the model flags: '
              f'{"; ".join(differ)})' if differ else '')
  return ''


def _read_config(path):
  """The dict of a config.json, None if it is missing or not a JSON object."""
  stored = files.read_json(path)
  return stored if isinstance(stored, dict) else None


def _config_differences(stored, config, where='workdir'):
  """The model flags that differ from a stored config; the fields that change how the model
  computes, not its weights (tfflows.config.RUNTIME_FIELDS: remat, conditioner_precision), may
  differ."""
  current = config.to_dict()
  return [f'--{train_flags.model_flag_name(k)}={_show(current[k])} ({where}: {_show(v)})'
          for k, v in sorted(stored.items())
          if k in current and k not in tfflows.config.RUNTIME_FIELDS
          and _norm(v) != _norm(current[k])]


def _norm(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def _show(value):
  return ','.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# ------------------------------------------------------------------------------ checkpoints

class Checkpointer:
  """Saves and restores the training state of a workdir (see the module docstring).

  is_chief: under MultiWorkerMirroredStrategy every worker restores from the workdir (if it can
  read it) and takes part in every save (a collective operation), but only the chief writes to
  the workdir; the others write to a private temporary directory (tempfile, outside the
  workdir) that ``close`` deletes. The best test bits/dim so far is read once from
  best/best.json and then kept in memory, so every worker takes the same decisions.
  probe_images: uint8 images [B, H, W, C] (the same on every worker); when given, a checkpoint
  is written only if the model's log-likelihood of every one of them is finite.

  Raises CheckpointError if WORKDIR/checkpoints holds checkpoints without a usable state file,
  and atomic.WriteError if the disk cannot hold one more checkpoint, before touching anything.
  """

  def __init__(self, workdir, model, optimizer, keep, is_chief=True, worker_id=0,
               probe_images=None):
    self.model = model
    self.restore_dir = os.path.join(workdir, files.CHECKPOINTS)
    self.committed = files.committed(self.restore_dir)  # refuses an unusable state first
    # Progress counters, not parameters: nothing trains them, and the tf.train.Checkpoint below
    # saves and restores them by name (tests/test_train.py resumes from them).
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.checkpoint = tf.train.Checkpoint(optimizer=optimizer, step=self.step, epoch=self.epoch,
                                          **{MODEL_VARIABLES: list(model.variables)})
    self.is_chief = is_chief
    self.probe_images = probe_images
    self.root = workdir if is_chief else _scratch_dir(workdir, worker_id)
    self.periodic_dir = os.path.join(self.root, files.CHECKPOINTS)
    self.best_dir = os.path.join(self.root, files.BEST)
    self.best_json = os.path.join(self.best_dir, files.BEST_JSON)
    if is_chief:
      self._tidy()
    self.best = files.read_best(os.path.join(workdir, files.BEST, files.BEST_JSON))
    self.best_prefix = files.best_checkpoint(self.best_dir) if is_chief else None
    if is_chief:
      disk_space.check_free_space(self.root,
                                  disk_space.checkpoint_bytes(self.checkpoint_variables()))
    self.manager = tf.train.CheckpointManager(self.checkpoint, self.periodic_dir,
                                              max_to_keep=keep, checkpoint_name='ckpt')
    self.last_saved_step = None
    self._good_step = None   # the step check_model last passed at

  def checkpoint_variables(self):
    optimizer = self.checkpoint.optimizer
    return list(self.model.variables) + list(getattr(optimizer, 'variables', []))

  def _tidy(self):
    """Deletes what interrupted saves left, and makes best/ agree with best.json."""
    for directory in (self.periodic_dir, self.best_dir):
      removed = files.remove_temporary_files(directory)
      if removed:
        logging.info('removed what an interrupted save left in %s: %s', directory,
                     ', '.join(removed))
    self._tidy_best()

  def _tidy_best(self):
    """best.json commits best/ (it is written before best/checkpoint): make the state file name
    the checkpoint best.json names and delete the others (a previous best whose deletion a kill
    interrupted, or a new one written before its best.json). Without best.json, checkpoints
    the state file does not name are such uncommitted leftovers too."""
    prefixes = files.checkpoint_prefixes(self.best_dir)
    if not prefixes:
      return
    names = ', '.join(os.path.basename(p) for p in prefixes)
    record = files.read_json(self.best_json)
    if os.path.exists(self.best_json) and not (isinstance(record, dict) and
                                               'test_bits_per_dim' in record):
      raise CheckpointError(f'{self.best_json} cannot be read but {self.best_dir} holds {names}: '
                            'which of them is the best, and how good, is unknown. Restore '
                            'best.json, or move best/ away.')
    named = files.best_json_checkpoint(self.best_dir)
    if named is None:
      if record is not None:   # best.json names a checkpoint that is gone: leave best/ alone
        logging.warning('%s names %s, which is missing; %s holds %s', self.best_json,
                        record.get('checkpoint'), self.best_dir, names)
        return
      named = files.state_checkpoint(self.best_dir)   # a best/ from before best.json was the record
    elif files.state_checkpoint(self.best_dir) != named:
      files.write_state(self.best_dir, named)
      logging.info('%s now names %s, the checkpoint %s names',
                   os.path.join(self.best_dir, files.STATE), os.path.basename(named),
                   files.BEST_JSON)
    for prefix in prefixes:
      if prefix != named:
        files.remove_checkpoint(prefix)
        logging.info('removed %s: not the committed best checkpoint (%s)', prefix,
                     os.path.basename(named) if named else 'none')

  def close(self):
    """Deletes a non-chief worker's scratch checkpoints."""
    if not self.is_chief and tf.io.gfile.exists(self.root):
      tf.io.gfile.rmtree(self.root)

  # ------------------------------------------------------------------------- restoring
  def restore_latest(self):
    """Restores the newest committed checkpoint of WORKDIR/checkpoints; returns its prefix, or
    None on a fresh run. Raises CheckpointError naming the checkpoint if it cannot be read or
    holds another architecture."""
    prefix = self.committed
    if prefix is None:
      return None
    checkpoint_contents.check_model_variables(prefix, self.model)
    try:
      status = self.checkpoint.restore(prefix)
    except checkpoint_contents.READ_ERRORS as error:
      raise CheckpointError(checkpoint_contents.unreadable(prefix, error)) from None
    try:
      status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
      raise CheckpointError(f'checkpoint {prefix} does not match the model and optimizer built '
                            f'from the flags: {str(error)[:500]}') from None
    self.last_saved_step = int(self.step.numpy())
    return prefix

  # --------------------------------------------------------------------------- checks
  @property
  def last_good(self):
    """The checkpoint the state file commits now (the last one written or restored), else
    the one committed at start-up."""
    return files.state_checkpoint(self.periodic_dir) or self.committed

  def check_model(self, what):
    """Raises PoisonedWeightsError naming the last good checkpoint unless the model is fit to
    be saved; ``what`` names the moment ('after step 9')."""
    problem = model_vetting.model_problem(self.model, self.probe_images)
    if problem:
      raise PoisonedWeightsError(f'{what}, {problem}: no checkpoint is written; '
                                 f'{model_vetting.resume_note(self.last_good)}. '
                                 f'{model_vetting.ADVICE}')

  def check_start(self, how, restored=None):
    """Raises PoisonedWeightsError unless the model training starts from is good: a checkpoint
    written before checkpoints were checked this way may hold a model that gives NaN."""
    problem = model_vetting.model_problem(self.model, self.probe_images)
    if not problem:
      return
    if restored:
      others = [os.path.basename(p) for p in files.checkpoint_prefixes(os.path.dirname(restored))
                if p != restored]
      raise PoisonedWeightsError(
          f'{how}: {problem}. {restored} is not a good state to train on: delete its files and '
          f'name an earlier checkpoint ({", ".join(others) or "none left"}) in '
          f'{os.path.join(os.path.dirname(restored), files.STATE)}, or start a new --workdir.')
    raise PoisonedWeightsError(f'{how}: {problem}; nothing is trained or written.')

  def _check_step(self, step):
    """check_model once per step (the periodic and the best save of an epoch end share it)."""
    if self._good_step != step:
      self.check_model(f'after step {step}')
      self._good_step = step

  # --------------------------------------------------------------------------- saving
  def save(self, step, epoch):
    """Writes ckpt-<step> (unless that step is saved already); returns the prefix or None.

    Raises PoisonedWeightsError (nothing written) for a model that is not good, and
    atomic.WriteError when the checkpoint cannot be written (its partial files are deleted;
    the last checkpoint stays committed)."""
    if step == self.last_saved_step:
      return None
    self._check_step(step)
    self.step.assign(step)
    self.epoch.assign(epoch)
    prefix = os.path.join(self.periodic_dir, f'ckpt-{step}')
    self._clear_name(prefix)
    try:
      saved = self.manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as error:
      self._abandon(prefix, self.periodic_dir)
      raise self._write_error(prefix, error) from None
    self.last_saved_step = step
    return saved

  def _clear_name(self, prefix):
    """Deletes the files of an uncommitted checkpoint of the same name (left by a killed run)
    so that the new save never mixes with them."""
    if files.checkpoint_files(prefix):
      files.remove_checkpoint(prefix)
      logging.info('removed %s, left by an interrupted run (its state file did not commit it), '
                   'before saving that step again', prefix)

  def _abandon(self, prefix, directory):
    """After a failed save: deletes the new checkpoint unless the state file commits it, and
    the temporary files."""
    try:
      state = files.read_state(directory)
    except CheckpointError:
      state = None
    if state != prefix:
      files.remove_checkpoint(prefix)
    files.remove_temporary_files(directory)

  def _write_error(self, prefix, error):
    error = atomic.write_error(prefix, error)
    kept = self.last_good
    error.reason += (f' (nothing of it is left; the last checkpoint, {kept}, is kept)' if kept
                     else ' (nothing of it is left)')
    return error

  def save_best(self, step, epoch, test_bits_per_dim):
    """Saves to best/ if test_bits_per_dim beats the best so far; returns True if it did.

    Order: the checkpoint, then best.json naming it (the commit), then best/checkpoint, then
    the previous best is deleted; a kill at any point leaves best.json naming a complete
    checkpoint, and the next start makes best/checkpoint agree with it."""
    if not np.isfinite(test_bits_per_dim) or test_bits_per_dim >= self.best:
      return False
    prefix = os.path.join(self.best_dir, f'ckpt-{step}')
    if prefix == self.best_prefix:
      return False
    self._check_step(step)
    self.step.assign(step)
    self.epoch.assign(epoch)
    self._clear_name(prefix)
    record = {'test_bits_per_dim': float(test_bits_per_dim), 'step': step, 'epoch': epoch,
              'checkpoint': os.path.basename(prefix)}
    done = False
    try:
      self.checkpoint.write(prefix)
      atomic.write_json(self.best_json, record)
      done = True
      files.write_state(self.best_dir, prefix)
    except (OSError, tf.errors.OpError) as error:
      if not done:
        files.remove_checkpoint(prefix)
      files.remove_temporary_files(self.best_dir)
      error = atomic.write_error(prefix, error)
      if not done:
        error.reason += (f' (nothing of it is left; the best checkpoint stays {self.best_prefix})'
                         if self.best_prefix else ' (nothing of it is left)')
      raise error from None
    if self.best_prefix:
      files.remove_checkpoint(self.best_prefix)
    self.best, self.best_prefix = float(test_bits_per_dim), prefix
    return True


def _scratch_dir(workdir, worker_id):
  """A new temporary directory for a non-chief worker's checkpoint writes. Leftovers of the
  same worker of the same run (a killed worker cannot delete its own) are deleted first."""
  prefix = f'tfflows_{hashlib.sha1(workdir.encode()).hexdigest()[:10]}_worker{worker_id}_'
  for stale in glob.glob(os.path.join(tempfile.gettempdir(), prefix + '*')):
    shutil.rmtree(stale, ignore_errors=True)
  return tempfile.mkdtemp(prefix=prefix)
