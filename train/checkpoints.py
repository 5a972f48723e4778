"""Checkpoints of a workdir: periodic ones (keep the last N) and the best by test bits/dim.

    WORKDIR/checkpoints/ckpt-<step>.{index,data-*}, checkpoint     periodic, newest N
    WORKDIR/best/ckpt-<step>.*, checkpoint, best.json              best test bits/dim so far

A checkpoint is a ``tf.train.Checkpoint(model_variables, optimizer, step, epoch)``:
``model_variables`` is ``model.variables`` as a list, in the model's fixed construction order:
every Keras weight (ActNorm's ``initialized`` flags included, so a restored model does not
initialise again) and the state of every Keras SeedGenerator. The optimizer brings its
iteration count and moments; step and epoch are the counters of the run.

Why a list and not ``model=model``: tf.train.Checkpoint follows the attributes of a Keras 3
model only partly. It does not see SeedGenerator states, nor layers held in plain Python lists
(FlowModel.priors), so a model restored through ``model=`` silently keeps the initial values of
its priors (a full restore hid this by finding those weights through the optimizer's list of
trainable variables). A list of ``model.variables`` is complete by construction, and a restore
first checks that the checkpoint holds exactly the model's variables, count and shapes.

What is committed, and what is never lost:

- The state file ``checkpoints/checkpoint`` is the commit record of the periodic checkpoints:
  TensorFlow writes a checkpoint's data and index first, and the CheckpointManager then
  rewrites the state file by write-to-temp-and-rename, so a process killed mid-save leaves the
  state naming the previous checkpoint, which is what a rerun restores. When ``checkpoints/``
  holds checkpoints but its state file is missing, unreadable or names a checkpoint whose files
  are gone, nothing is resumed, started or deleted: ``CheckpointError`` names the state file
  and the newest checkpoint there (a fresh run would overwrite and delete them).
- A name is never saved over: files of ``ckpt-N`` that the state does not commit (left by a
  killed run, newer than the checkpoint a rerun resumed from) are deleted before ``ckpt-N`` is
  saved again, so no index of one save can end up beside the data of another.
- ``best.json`` is the commit record of ``best/``: the best checkpoint is written, then
  best.json naming it (atomically), then best/checkpoint, then the previous best is deleted.
  At start-up best/checkpoint is rewritten from best.json if a kill came in between, and
  checkpoints best.json does not name are deleted, so the two never disagree.
- What a killed save leaves (``checkpoint.tmp*``, ``ckpt-N_temp/``, data files without an
  index, temporary JSON files) is deleted at start-up, in ``checkpoints/`` and ``best/``.
- A checkpoint is written only from a good model: its weights are finite and, with probe
  images, its log-likelihood of them is finite (weights can be finite while the model gives NaN
  on every image). Otherwise ``PoisonedWeightsError`` names the last good checkpoint.
- A failed write (full disk, read-only directory) raises ``atomic.WriteError`` ("cannot write
  PATH: No space left on device"), deletes the partial files and keeps the last checkpoint.
"""

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorflow.core.protobuf import trackable_object_graph_pb2
from tensorflow.python.checkpoint import checkpoint_management  # CheckpointState proto

from tfflows import atomic
from tfflows.models.flow_model import NonFiniteError

CHECKPOINTS = 'checkpoints'
BEST = 'best'
BEST_JSON = 'best.json'
STATE = 'checkpoint'
MODEL_VARIABLES = 'model_variables'
PROBE_SEED = 0  # the stateless seed of the probe log-likelihood


class PoisonedWeightsError(RuntimeError):
  """The model's weights hold NaN or Inf, or the model gives a non-finite log-likelihood;
  nothing is saved."""


class CheckpointError(ValueError):
  """A checkpoint, or a checkpoint state, that cannot be used; the message names the file."""


# What TensorFlow raises reading damaged checkpoint files: OpErrors (DataLossError "not an
# sstable"), and from the checkpoint reader's bindings IndexError ("Read less bytes than
# requested") or ValueError.
_READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError)


# ------------------------------------------------------------------------- files on disk
_INDEX = re.compile(r'^(ckpt-\d+)\.index$')
_DATA = re.compile(r'^(ckpt-\d+)\.data-\d+-of-\d+$')
_TEMP_DIR = re.compile(r'^ckpt-\d+_temp$')
_STATE_TMP = re.compile(r'^checkpoint\.tmp[0-9a-f]*$')


def checkpoint_prefixes(directory):
  """Prefixes of the checkpoints (those with an index file) in ``directory``, oldest step
  first."""
  if not os.path.isdir(directory):
    return []
  names = [m.group(1) for m in map(_INDEX.match, os.listdir(directory)) if m]
  return [os.path.join(directory, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def checkpoint_files(prefix):
  """The paths of a checkpoint's files that exist: index, data shards, TF's _temp directory."""
  directory, name = os.path.split(prefix)
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f == name + '.index' or f == name + '_temp' or
                (f.startswith(name + '.data-') and _DATA.match(f)))


def remove_checkpoint(prefix):
  """Deletes every file of checkpoint ``prefix``; returns how many paths it removed."""
  paths = checkpoint_files(prefix)
  for path in paths:
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      _remove(path)
  return len(paths)


def remove_temporary_files(directory):
  """Deletes what an interrupted save leaves in a checkpoint directory: the state file's
  temporary copies (checkpoint.tmp<hex>), TensorFlow's ckpt-N_temp/ directories, data files
  without an index (a kill between renaming the data and writing the index), and the temporary
  files of atomic writes. Returns the names removed."""
  if not os.path.isdir(directory):
    return []
  names = os.listdir(directory)
  indexed = {m.group(1) for m in map(_INDEX.match, names) if m}
  removed = []
  for name in names:
    path = os.path.join(directory, name)
    data = _DATA.match(name)
    if _TEMP_DIR.match(name) and os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    elif _STATE_TMP.match(name) or atomic.is_temporary(name) or (data and data.group(1)
                                                                  not in indexed):
      _remove(path)
    else:
      continue
    removed.append(name)
  return sorted(removed)


def _remove(path):
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# ------------------------------------------------------------------------ the state file
def read_state(directory):
  """The checkpoint prefix the state file of ``directory`` names, or None when there is no
  state file. Raises CheckpointError naming the file when it cannot be read or parsed."""
  path = os.path.join(directory, STATE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    state = text_format.Parse(text, checkpoint_management.CheckpointState())
  except (OSError, UnicodeDecodeError, text_format.ParseError) as error:
    raise CheckpointError(_unusable_state(directory, f'it cannot be read: {_one_line(error)}'))
  if not state.model_checkpoint_path:
    raise CheckpointError(_unusable_state(directory, 'it names no checkpoint'))
  return os.path.join(directory, state.model_checkpoint_path)


def write_state(directory, prefix):
  """Makes ``prefix`` the one checkpoint the state file of ``directory`` names (atomic)."""
  name = os.path.relpath(prefix, directory)
  atomic.write_text(os.path.join(directory, STATE), f'model_checkpoint_path: "{name}"\n'
                    f'all_model_checkpoint_paths: "{name}"\n')


def committed(directory):
  """The newest checkpoint the state file of ``directory`` commits; None when the directory
  holds no checkpoint (a fresh start loses nothing).

  Raises CheckpointError, naming the state file, when the directory holds checkpoints but the
  state file is missing, unreadable, or names a checkpoint whose files are gone: which of the
  files on disk a finished save committed is then unknown, and starting afresh would overwrite
  and delete them."""
  prefixes = checkpoint_prefixes(directory)
  if not prefixes:
    return None
  if not os.path.exists(os.path.join(directory, STATE)):
    raise CheckpointError(_unusable_state(directory, 'it is missing'))
  prefix = read_state(directory)
  if not os.path.exists(prefix + '.index'):
    raise CheckpointError(_unusable_state(
        directory, f'it names {os.path.basename(prefix)}, whose files are missing'))
  return prefix


def _unusable_state(directory, problem):
  path = os.path.join(directory, STATE)
  prefixes = checkpoint_prefixes(directory)
  if not prefixes:
    return f'{path}: {problem}.'
  names = ', '.join(os.path.basename(p) for p in prefixes)
  newest = os.path.basename(prefixes[-1])
  return (f'the checkpoint state {path} is unusable ({problem}) while {directory} holds '
          f'{names}: refusing to start over them (a fresh run would overwrite and delete '
          f'them). To resume from the newest, {newest}, write the state file: printf '
          f'\'model_checkpoint_path: "{newest}"\\n\' > {path}; to start afresh, use a new '
          '--workdir.')


def _one_line(error):
  text = getattr(error, 'message', None) or str(error)
  return ' '.join(text.split())[:300]


# ------------------------------------------------------------------- finding checkpoints
def best_checkpoint(best_dir):
  """The checkpoint of a best/ directory: the one best.json names (its commit record), else
  the one its state file names (a best/ written before best.json was the record); None if
  none."""
  named = _best_json_checkpoint(best_dir)
  if named:
    return named
  return _state_checkpoint(best_dir)


def _state_checkpoint(directory):
  """The checkpoint the state file names if it is readable and the checkpoint exists."""
  try:
    prefix = read_state(directory)
  except CheckpointError:
    return None
  return prefix if prefix and os.path.exists(prefix + '.index') else None


def _best_json_checkpoint(best_dir):
  record = _read_json(os.path.join(best_dir, BEST_JSON))
  name = record.get('checkpoint') if isinstance(record, dict) else None
  if isinstance(name, str) and name:
    prefix = os.path.join(best_dir, os.path.basename(name))
    if os.path.exists(prefix + '.index'):
      return prefix
  return None


def find_checkpoint(path):
  """A checkpoint prefix from a prefix, a checkpoint directory (best/ included) or a workdir;
  None if there is none. Raises CheckpointError for a directory with checkpoints but no usable
  state."""
  path = os.fspath(path)
  if os.path.exists(path + '.index'):
    return path
  if os.path.isdir(path):
    for directory in (path, os.path.join(path, CHECKPOINTS)):
      if os.path.exists(os.path.join(directory, BEST_JSON)):
        prefix = best_checkpoint(directory)
      else:
        prefix = committed(directory)
      if prefix:
        return prefix
  return None


def resolve(workdir, which):
  """The checkpoint prefix named by --checkpoint: 'latest', 'best' or a path; None if none."""
  if which == 'latest':
    return committed(os.path.join(workdir, CHECKPOINTS))
  if which == 'best':
    return best_checkpoint(os.path.join(workdir, BEST))
  return find_checkpoint(which)


def step_of(prefix):
  """The step number of a checkpoint prefix ``.../ckpt-<step>``."""
  return int(prefix.rsplit('-', 1)[1])


# ----------------------------------------------------------------------------- restoring
def model_checkpoint(model):
  """A checkpoint of the model alone (restores from a full training checkpoint)."""
  return tf.train.Checkpoint(**{MODEL_VARIABLES: list(model.variables)})


def _reader(prefix):
  try:
    return tf.train.load_checkpoint(prefix)
  except _READ_ERRORS as error:
    raise CheckpointError(_unreadable(prefix, error)) from None


def _unreadable(prefix, error):
  return (f'checkpoint {prefix} cannot be read ({_one_line(error)}): its files '
          f'({", ".join(os.path.basename(p) for p in checkpoint_files(prefix)) or "none"}) are '
          'truncated or damaged.')


def check_model_variables(prefix, model):
  """Raises CheckpointError (a ValueError) unless checkpoint ``prefix`` holds exactly the
  model's variables: as many, each of the same shape (a checkpoint of another architecture
  would otherwise restore partly, or fail deep inside TensorFlow). The message names the
  first variable that differs."""
  reader = _reader(prefix)
  try:
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
  except _READ_ERRORS as error:
    raise CheckpointError(_unreadable(prefix, error)) from None
  root = graph.nodes[0]
  node = next((graph.nodes[c.node_id] for c in root.children if c.local_name == MODEL_VARIABLES),
              None)
  stored = len(node.children) if node is not None else 0
  variables = model.variables
  if stored != len(variables):
    raise CheckpointError(
        f'checkpoint {prefix} holds {stored} model variables, the model built from the flags '
        f'has {len(variables)}: a different architecture (were the model flags different when '
        'it was written?).')
  shapes = reader.get_variable_to_shape_map()
  for i, v in enumerate(variables):
    stored_shape = shapes.get(f'{MODEL_VARIABLES}/{i}/.ATTRIBUTES/VARIABLE_VALUE')
    if stored_shape is not None and list(stored_shape) != list(v.shape):
      raise CheckpointError(
          f'checkpoint {prefix} holds model variable {i} ({v.path}) with shape {stored_shape}, '
          f'the model built from the flags has shape {list(v.shape)}: a different architecture '
          '(were the model flags different when it was written?).')


def restore_model(model, prefix):
  """Loads the model weights (and SeedGenerator states) of checkpoint ``prefix``.

  Raises CheckpointError (a ValueError) naming the checkpoint when its files cannot be read or
  it holds another architecture."""
  check_model_variables(prefix, model)
  try:
    status = model_checkpoint(model).read(prefix)
  except _READ_ERRORS as error:
    raise CheckpointError(_unreadable(prefix, error)) from None
  status.expect_partial()
  try:
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as error:
    raise CheckpointError(f'checkpoint {prefix} does not hold this model (were the model flags '
                          f'different when it was written?): {str(error)[:500]}') from None
  return prefix


# ------------------------------------------------------------------------------- checks
def check_finite(model):
  """Raises PoisonedWeightsError naming the first model variable with NaN or Inf."""
  for v in model.variables:
    if tf.as_dtype(v.dtype).is_floating and not np.all(np.isfinite(np.asarray(v))):
      raise PoisonedWeightsError(f'variable {v.path} holds NaN or Inf; the checkpoint is not '
                                 'written.')


def non_finite_log_prob(model, images):
  """How many of ``images`` (uint8 [B, H, W, C]) the model gives a NaN or Inf log-likelihood
  (one seeded sample, non-XLA tf.function, inference mode)."""
  log_prob = model.log_prob(images, seed=PROBE_SEED).numpy()
  return int(np.sum(~np.isfinite(log_prob)))


def checkpoint_bytes(variables):
  """Bytes of the values of ``variables`` (what a checkpoint of them holds, index aside)."""
  return int(sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables))


def check_free_space(directory, needed):
  """Raises atomic.WriteError when the file system of ``directory`` (or its nearest existing
  parent) has less than ``needed`` bytes free."""
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    free = shutil.disk_usage(existing).free
  except OSError:
    return
  if free < needed:
    raise atomic.WriteError(directory, f'{os.strerror(errno.ENOSPC)}: {_mib(free)} free, a '
                            f'checkpoint of this model needs {_mib(needed)}', errno.ENOSPC)


def _mib(size):
  return f'{size / 2 ** 20:.1f} MiB' if size >= 2 ** 20 else f'{size / 2 ** 10:.1f} KiB'


# ----------------------------------------------------------------------------- saving
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
    self.restore_dir = os.path.join(workdir, CHECKPOINTS)
    self.committed = committed(self.restore_dir)   # refuses an unusable state before anything
    # Progress counters, not parameters: nothing trains them, and the tf.train.Checkpoint below
    # saves and restores them by name (tests/test_train.py resumes from them).
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.checkpoint = tf.train.Checkpoint(optimizer=optimizer, step=self.step, epoch=self.epoch,
                                          **{MODEL_VARIABLES: list(model.variables)})
    self.is_chief = is_chief
    self.probe_images = probe_images
    self.root = workdir if is_chief else _scratch_dir(workdir, worker_id)
    self.periodic_dir = os.path.join(self.root, CHECKPOINTS)
    self.best_dir = os.path.join(self.root, BEST)
    self.best_json = os.path.join(self.best_dir, BEST_JSON)
    if is_chief:
      self._tidy()
    self.best = read_best(os.path.join(workdir, BEST, BEST_JSON))
    self.best_prefix = best_checkpoint(self.best_dir) if is_chief else None
    if is_chief:
      check_free_space(self.root, checkpoint_bytes(self.checkpoint_variables()))
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
      removed = remove_temporary_files(directory)
      if removed:
        logging.info('removed what an interrupted save left in %s: %s', directory,
                     ', '.join(removed))
    self._tidy_best()

  def _tidy_best(self):
    """best.json commits best/ (it is written before best/checkpoint): make the state file name
    the checkpoint best.json names and delete the others (a previous best whose deletion a kill
    interrupted, or a new one written before its best.json). Without best.json, checkpoints
    the state file does not name are such uncommitted leftovers too."""
    prefixes = checkpoint_prefixes(self.best_dir)
    if not prefixes:
      return
    names = ', '.join(os.path.basename(p) for p in prefixes)
    record = _read_json(self.best_json)
    if os.path.exists(self.best_json) and not (isinstance(record, dict) and
                                               'test_bits_per_dim' in record):
      raise CheckpointError(f'{self.best_json} cannot be read but {self.best_dir} holds {names}: '
                            'which of them is the best, and how good, is unknown. Restore '
                            'best.json, or move best/ away.')
    named = _best_json_checkpoint(self.best_dir)
    if named is None:
      if record is not None:   # best.json names a checkpoint that is gone: leave best/ alone
        logging.warning('%s names %s, which is missing; %s holds %s', self.best_json,
                        record.get('checkpoint'), self.best_dir, names)
        return
      named = _state_checkpoint(self.best_dir)   # a best/ from before best.json was the record
    elif _state_checkpoint(self.best_dir) != named:
      write_state(self.best_dir, named)
      logging.info('%s now names %s, the checkpoint %s names', os.path.join(self.best_dir, STATE),
                   os.path.basename(named), BEST_JSON)
    for prefix in prefixes:
      if prefix != named:
        remove_checkpoint(prefix)
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
    check_model_variables(prefix, self.model)
    try:
      status = self.checkpoint.restore(prefix)
    except _READ_ERRORS as error:
      raise CheckpointError(_unreadable(prefix, error)) from None
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
    return _state_checkpoint(self.periodic_dir) or self.committed

  def model_problem(self):
    """Why the model is not fit to be saved (NaN or Inf weights, or with probe images a NaN or
    Inf log-likelihood of one of them), or None if it is."""
    for v in self.model.variables:
      if tf.as_dtype(v.dtype).is_floating and not np.all(np.isfinite(np.asarray(v))):
        return f'model variable {v.path} holds NaN or Inf'
    if self.probe_images is not None:
      bad = non_finite_log_prob(self.model, self.probe_images)
      if bad:
        return (f'the model gives a NaN or Inf log-likelihood for {bad} of '
                f'{len(self.probe_images)} probe test images although its weights are finite')
    return None

  def check_model(self, what):
    """Raises PoisonedWeightsError naming the last good checkpoint unless the model is fit to
    be saved; ``what`` names the moment ('after step 9')."""
    problem = self.model_problem()
    if problem:
      last = self.last_good
      where = (f'the last good checkpoint is {last}; rerunning resumes from it' if last else
               'there is no earlier checkpoint, so rerunning starts afresh')
      raise PoisonedWeightsError(
          f'{what}, {problem}: no checkpoint is written; {where}. Try a longer --warmup_steps, '
          'a lower --learning_rate, or --max_grad_norm.')

  def check_start(self, how, restored=None):
    """Raises PoisonedWeightsError unless the model training starts from is good: a checkpoint
    written before checkpoints were checked this way may hold a model that gives NaN."""
    problem = self.model_problem()
    if not problem:
      return
    if restored:
      others = [os.path.basename(p) for p in checkpoint_prefixes(os.path.dirname(restored))
                if p != restored]
      raise PoisonedWeightsError(
          f'{how}: {problem}. {restored} is not a good state to train on: delete its files and '
          f'name an earlier checkpoint ({", ".join(others) or "none left"}) in '
          f'{os.path.join(os.path.dirname(restored), STATE)}, or start a new --workdir.')
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
      saved = self._write_periodic(step)
    except (OSError, tf.errors.OpError) as error:
      self._abandon(prefix, self.periodic_dir)
      raise self._write_error(prefix, error) from None
    self.last_saved_step = step
    return saved

  def _write_periodic(self, step):
    return self.manager.save(checkpoint_number=step)

  def _write_checkpoint(self, prefix):
    return self.checkpoint.write(prefix)

  def _clear_name(self, prefix):
    """Deletes the files of an uncommitted checkpoint of the same name (left by a killed run)
    so that the new save never mixes with them."""
    if checkpoint_files(prefix):
      remove_checkpoint(prefix)
      logging.info('removed %s, left by an interrupted run (its state file did not commit it), '
                   'before saving that step again', prefix)

  def _abandon(self, prefix, directory):
    """After a failed save: deletes the new checkpoint unless the state file commits it, and
    the temporary files."""
    try:
      state = read_state(directory)
    except CheckpointError:
      state = None
    if state != prefix:
      remove_checkpoint(prefix)
    remove_temporary_files(directory)

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
      self._write_checkpoint(prefix)
      write_json(self.best_json, record)
      done = True
      write_state(self.best_dir, prefix)
    except (OSError, tf.errors.OpError) as error:
      if not done:
        remove_checkpoint(prefix)
      remove_temporary_files(self.best_dir)
      error = atomic.write_error(prefix, error)
      if not done:
        error.reason += (f' (nothing of it is left; the best checkpoint stays {self.best_prefix})'
                         if self.best_prefix else ' (nothing of it is left)')
      raise error from None
    if self.best_prefix:
      remove_checkpoint(self.best_prefix)
    self.best, self.best_prefix = float(test_bits_per_dim), prefix
    return True


def _scratch_dir(workdir, worker_id):
  """A new temporary directory for a non-chief worker's checkpoint writes. Leftovers of the
  same worker of the same run (a killed worker cannot delete its own) are deleted first."""
  prefix = f'tfflows_{hashlib.sha1(workdir.encode()).hexdigest()[:10]}_worker{worker_id}_'
  for stale in glob.glob(os.path.join(tempfile.gettempdir(), prefix + '*')):
    shutil.rmtree(stale, ignore_errors=True)
  return tempfile.mkdtemp(prefix=prefix)


# -------------------------------------------------------------------------------- JSON
def read_best(path):
  """The test bits/dim recorded in a best.json (inf if there is none)."""
  record = _read_json(path)
  try:
    return float(record['test_bits_per_dim'])
  except (TypeError, KeyError, ValueError):
    return float('inf')


def _read_json(path):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path, values):
  """Writes JSON atomically (temp file in the same directory, then os.replace).

  Raises NonFiniteError (a FloatingPointError) naming the file and the keys if a value is NaN
  or Inf (JSON has no such numbers; Python's json would write the invalid tokens NaN and
  Infinity), and atomic.WriteError if the file cannot be written."""
  try:
    text = json.dumps(values, indent=2, sort_keys=True, allow_nan=False)
  except ValueError:
    raise NonFiniteError(f'refusing to write {path}: {", ".join(_non_finite_keys(values))}; '
                         'JSON cannot hold NaN or Inf.') from None
  atomic.write_text(path, text + '\n')


def _non_finite_keys(values, prefix=''):
  found = []
  items = values.items() if isinstance(values, dict) else enumerate(values) \
      if isinstance(values, (list, tuple)) else []
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, float) and not np.isfinite(value):
      found.append(f'{name} is {value}')
    elif isinstance(value, (dict, list, tuple)):
      found.extend(_non_finite_keys(value, name + '.'))
  return found or ['a value is']
