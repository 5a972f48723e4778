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
trainable variables). A list of ``model.variables`` is complete by construction, and the
restore checks that the checkpoint holds exactly as many model variables as the model.

Atomicity: TensorFlow writes the data and index files of a checkpoint first, and the
CheckpointManager then rewrites its ``checkpoint`` state file by write-to-temp-and-rename; a
process killed mid-save leaves the state file naming the previous checkpoint, which is what a
rerun restores. Before every save the model's variables are checked to be finite, so a NaN can
never reach a checkpoint.
"""

import glob
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tfflows import atomic

CHECKPOINTS = 'checkpoints'
BEST = 'best'
BEST_JSON = 'best.json'


class PoisonedWeightsError(RuntimeError):
  """The model's weights contain NaN or Inf; nothing is saved."""


MODEL_VARIABLES = 'model_variables'


def model_checkpoint(model):
  """A checkpoint of the model alone (restores from a full training checkpoint)."""
  return tf.train.Checkpoint(**{MODEL_VARIABLES: list(model.variables)})


def check_model_variables(prefix, model):
  """Raises ValueError unless checkpoint ``prefix`` holds exactly len(model.variables) model
  variables (a checkpoint of another architecture would otherwise restore partly)."""
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(tf.train.load_checkpoint(prefix).get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
  root = graph.nodes[0]
  node = next((graph.nodes[c.node_id] for c in root.children if c.local_name == MODEL_VARIABLES),
              None)
  stored = len(node.children) if node is not None else 0
  if stored != len(model.variables):
    raise ValueError(f'checkpoint {prefix} holds {stored} model variables, the model built from '
                     f'the flags has {len(model.variables)}: a different architecture (were the '
                     'model flags different when it was written?).')


def find_checkpoint(path):
  """A checkpoint prefix from a prefix, a checkpoint directory or a workdir; None if none."""
  path = os.fspath(path)
  if tf.io.gfile.exists(path + '.index'):
    return path
  if tf.io.gfile.isdir(path):
    for directory in (path, os.path.join(path, CHECKPOINTS)):
      latest = tf.train.latest_checkpoint(directory)
      if latest:
        return latest
  return None


def resolve(workdir, which):
  """The checkpoint prefix named by --checkpoint: 'latest', 'best' or a path; None if none."""
  if which == 'latest':
    return tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINTS))
  if which == 'best':
    return tf.train.latest_checkpoint(os.path.join(workdir, BEST))
  return find_checkpoint(which)


def restore_model(model, prefix):
  """Loads the model weights (and SeedGenerator states) of checkpoint ``prefix``.

  Raises ValueError naming the checkpoint when a model weight has no value in it (a different
  architecture)."""
  check_model_variables(prefix, model)
  status = model_checkpoint(model).read(prefix)
  status.expect_partial()
  try:
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as error:
    raise ValueError(f'checkpoint {prefix} does not hold this model (were the model flags '
                     f'different when it was written?): {str(error)[:500]}') from None
  return prefix


def step_of(prefix):
  """The step number of a checkpoint prefix ``.../ckpt-<step>``."""
  return int(prefix.rsplit('-', 1)[1])


def check_finite(model):
  """Raises PoisonedWeightsError naming the first model variable with NaN or Inf."""
  for v in model.variables:
    if tf.as_dtype(v.dtype).is_floating and not np.all(np.isfinite(np.asarray(v))):
      raise PoisonedWeightsError(f'variable {v.path} holds NaN or Inf; the checkpoint is not '
                                 'written.')


class Checkpointer:
  """Saves and restores the training state of a workdir.

  is_chief: under MultiWorkerMirroredStrategy every worker restores from the workdir (if it can
  read it) and takes part in every save, but only the chief writes to the workdir; the others
  write to a private temporary directory (tempfile, outside the workdir) that ``close``
  deletes. The best test bits/dim so far is read once from best/best.json and then kept in
  memory, so every worker takes the same decisions.
  """

  def __init__(self, workdir, model, optimizer, keep, is_chief=True, worker_id=0):
    self.model = model
    # Progress counters, not parameters: nothing trains them, and the tf.train.Checkpoint below
    # saves and restores them by name (tests/test_train.py resumes from them).
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
    self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
    self.checkpoint = tf.train.Checkpoint(optimizer=optimizer, step=self.step, epoch=self.epoch,
                                          **{MODEL_VARIABLES: list(model.variables)})
    self.is_chief = is_chief
    self.restore_dir = os.path.join(workdir, CHECKPOINTS)
    self.root = workdir if is_chief else _scratch_dir(workdir, worker_id)
    self.best_json = os.path.join(self.root, BEST, BEST_JSON)
    self.best = read_best(os.path.join(workdir, BEST, BEST_JSON))
    self.manager = tf.train.CheckpointManager(self.checkpoint,
                                              os.path.join(self.root, CHECKPOINTS),
                                              max_to_keep=keep, checkpoint_name='ckpt')
    self.best_manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(self.root, BEST),
                                                   max_to_keep=1, checkpoint_name='ckpt')
    self.last_saved_step = None

  def close(self):
    """Deletes a non-chief worker's scratch checkpoints."""
    if not self.is_chief and tf.io.gfile.exists(self.root):
      tf.io.gfile.rmtree(self.root)

  def restore_latest(self):
    """Restores the newest checkpoint of WORKDIR/checkpoints; returns its prefix, or None on a
    fresh run."""
    prefix = tf.train.latest_checkpoint(self.restore_dir)
    if prefix is None:
      return None
    check_model_variables(prefix, self.model)
    status = self.checkpoint.restore(prefix)
    try:
      status.assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
      raise ValueError(f'checkpoint {prefix} does not match the model and optimizer built '
                       f'from the flags: {str(error)[:500]}') from None
    self.last_saved_step = int(self.step.numpy())
    return prefix

  def save(self, step, epoch):
    """Writes ckpt-<step> (unless that step is saved already); returns the prefix or None."""
    if step == self.last_saved_step:
      return None
    check_finite(self.model)
    self.step.assign(step)
    self.epoch.assign(epoch)
    prefix = self.manager.save(checkpoint_number=step)
    self.last_saved_step = step
    return prefix

  def save_best(self, step, epoch, test_bits_per_dim):
    """Saves to best/ if test_bits_per_dim beats the best so far; returns True if it did."""
    if not np.isfinite(test_bits_per_dim) or test_bits_per_dim >= self.best:
      return False
    check_finite(self.model)
    self.step.assign(step)
    self.epoch.assign(epoch)
    prefix = self.best_manager.save(checkpoint_number=step)
    self.best = float(test_bits_per_dim)
    write_json(self.best_json, {'test_bits_per_dim': self.best, 'step': step, 'epoch': epoch,
                                'checkpoint': os.path.basename(prefix)})
    return True


def _scratch_dir(workdir, worker_id):
  """A new temporary directory for a non-chief worker's checkpoint writes. Leftovers of the
  same worker of the same run (a killed worker cannot delete its own) are deleted first."""
  prefix = f'tfflows_{hashlib.sha1(workdir.encode()).hexdigest()[:10]}_worker{worker_id}_'
  for stale in glob.glob(os.path.join(tempfile.gettempdir(), prefix + '*')):
    shutil.rmtree(stale, ignore_errors=True)
  return tempfile.mkdtemp(prefix=prefix)


def read_best(path):
  """The test bits/dim recorded in a best.json (inf if there is none)."""
  try:
    with open(path, encoding='utf-8') as f:
      return float(json.load(f)['test_bits_per_dim'])
  except (OSError, ValueError, KeyError):
    return float('inf')


def write_json(path, values):
  """Writes JSON atomically (temp file in the same directory, then os.replace)."""
  atomic.write_bytes(path, (json.dumps(values, indent=2, sort_keys=True) + '\n').encode('utf-8'))
