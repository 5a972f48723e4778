"""The run: checked flag values, the model config, the workdir, and what every mode shares.

``Run.from_flags`` turns parsed absl flags into a Run or raises ``app.UsageError`` naming the
flag (or pair of flags) at fault; modes take a Run and use its helpers for datasets and for the
model restored from a checkpoint. Start-up checks cost no compute and write nothing: the
directories the modes write to (--workdir, --export_dir) must be writable directories (a test
file is written and deleted), and the workdir must pass ``train.checkpoints``' start checks
(config.json describes the model of the flags; a usable checkpoint state file).
"""

import dataclasses
import math
import os
import tempfile

import numpy as np
import tensorflow as tf
from absl import app
from absl import logging

import tfflows
from tfflows.data import pipeline
from train import checkpoint_contents
from train import checkpoint_files
from train import checkpoints
from train import distributed
from train import flags as train_flags


def say(message, *args):
  """Prints the figures a user wants to see (stdout; the log goes to stderr)."""
  print(message % args if args else message, flush=True)


class UserError(Exception):
  """A problem the user can fix (missing data or checkpoint, bad workdir): message, no trace."""


@dataclasses.dataclass
class Run:
  flags: object  # the parsed absl FlagValues
  config: tfflows.FlowConfig
  workdir: str
  modes: list
  jit_compile: bool
  temperatures: list
  _models: dict = dataclasses.field(default_factory=dict)

  # ------------------------------------------------------------------------------ creation
  @classmethod
  def from_flags(cls, flag_values, known_modes, trains=('train',)):
    """Checks the flags; raises app.UsageError naming the flag at fault."""
    f = flag_values
    if not f.workdir:
      raise app.UsageError('--workdir is required: the directory of the run.')
    modes = [m.strip() for m in f.mode.split(',') if m.strip()]
    unknown = [m for m in modes if m not in known_modes]
    if not modes or unknown:
      raise app.UsageError(f'--mode={f.mode}: unknown mode {", ".join(unknown) or "(empty)"}; '
                           f'known modes: {", ".join(known_modes)}.')
    config = _flow_config(f)
    workdir = os.path.abspath(f.workdir)
    temperatures = _temperatures(f)
    check_writable_dir(workdir, 'workdir', checkpoints.WORKDIR_SUBDIRS)
    if 'export' in modes and f.export_dir:
      check_writable_dir(f.export_dir, 'export_dir')
    checkpoints.check_config(workdir, config)
    # A WORKDIR/checkpoints that holds checkpoints must have a usable state file.
    checkpoint_files.committed(os.path.join(workdir, checkpoint_files.CHECKPOINTS))
    run = cls(flags=f, config=config, workdir=workdir, modes=modes,
              jit_compile=f.jit_compile, temperatures=temperatures)
    run._check_checkpoint_exists(trains)
    _check_combinations(f)
    return run

  def _check_checkpoint_exists(self, trains):
    """A mode that reads a checkpoint before any training mode in --mode needs one now."""
    for mode in self.modes:
      if mode in trains:
        return
      if checkpoint_files.resolve(self.workdir, self.flags.checkpoint) is None:
        raise app.UsageError(
            f'--mode={mode} needs a trained model but --checkpoint={self.flags.checkpoint} '
            f'finds no checkpoint in --workdir={self.workdir}; train first (--mode=train,{mode})'
            ' or pass --checkpoint=PATH.')

  # ------------------------------------------------------------------------------ numbers
  @property
  def eval_batch_size(self):
    return self.flags.eval_batch_size or self.flags.batch_size

  @property
  def num_train(self):
    return pipeline.dataset_info(self.flags.dataset)[1]

  @property
  def steps_per_epoch(self):
    """--steps_per_epoch, or training images // batch_size (at least 1)."""
    return self.flags.steps_per_epoch or max(1, self.num_train // self.flags.batch_size)

  def path(self, *parts):
    return os.path.join(self.workdir, *parts)

  # ----------------------------------------------------------------------------- datasets
  def train_dataset(self, seed, batch_size=None, num_shards=1, shard_index=0):
    """Shuffled, augmented, repeated uint8 batches of the training split (of --batch_size, or
    batch_size); num_shards / shard_index: one replica's part of the split."""
    f = self.flags
    augment = (['flip'] if f.flip else []) + (['translate'] if f.translate_pixels else [])
    return self._dataset('train', batch_size or f.batch_size, shuffle=True, augment=augment,
                         translate_pixels=f.translate_pixels, deterministic=f.deterministic,
                         seed=seed, num_shards=num_shards, shard_index=shard_index)

  def test_dataset(self, drop_remainder=True):
    """The first --eval_batches batches (all if 0) of the test split, in a fixed order."""
    ds = self._dataset('test', self.eval_batch_size, shuffle=False, augment=(), repeat=False,
                       drop_remainder=drop_remainder, deterministic=True, seed=self.flags.seed)
    return ds.take(self.flags.eval_batches) if self.flags.eval_batches else ds

  def images(self, split, n):
    """The first n images (uint8 numpy) of a split in its fixed order."""
    ds = self._dataset(split, n, shuffle=False, augment=(), repeat=False, drop_remainder=False,
                       deterministic=True, seed=0)
    return next(iter(ds)).numpy()

  def image_batches(self, split, batch_size=1024):
    """Every image of a split in its fixed order, as a stream of uint8 numpy batches."""
    ds = self._dataset(split, batch_size, shuffle=False, augment=(), repeat=False,
                       drop_remainder=False, deterministic=True, seed=0)
    return ds.as_numpy_iterator()

  def all_images(self, split):
    """Every image of a split as one uint8 numpy array."""
    return np.concatenate(list(self.image_batches(split)))

  def _dataset(self, split, batch_size, **kwargs):
    try:
      return pipeline.make_dataset(self.flags.dataset, split, batch_size,
                                   data_dir=self.flags.data_dir, **kwargs)
    except FileNotFoundError as error:
      raise UserError(f'--dataset={self.flags.dataset}: data not found. {error}') from None

  # ------------------------------------------------------------------------- distribution
  @property
  def strategy(self):
    """The tf.distribute strategy of --strategy (made once per process:
    ``distributed.make_strategy``)."""
    return distributed.make_strategy(self.flags.strategy, self.flags.worker_timeout_seconds)

  @property
  def is_chief(self):
    """False on the workers of a multi-worker run that are not its chief (they write
    nothing to the workdir)."""
    return self.flags.strategy != 'multiworker' or distributed.is_chief(self.strategy)[0]

  @property
  def eval_shard(self):
    """(this worker's index, number of workers) over which --mode=eval spreads its batches;
    (0, 1) unless --strategy=multiworker."""
    if self.flags.strategy != 'multiworker':
      return 0, 1
    return distributed.worker_index(self.strategy), distributed.num_workers(self.strategy)

  def gather_batches(self, results, sizes, width):
    """The float64 [images, width] per-image results of every batch of a stream (sizes: the
    size of each batch), from {batch index: [size, width]} of the batches each worker
    computed (eval_shard)."""
    if self.flags.strategy != 'multiworker':
      return np.concatenate([np.zeros((0, width))] + [results[i] for i in range(len(sizes))])
    return distributed.gather_batches(self.strategy, results, sizes, width)

  # -------------------------------------------------------------------------------- model
  def load_model(self, which=None):
    """(model, checkpoint prefix): the model built from the flags, restored from the
    checkpoint --checkpoint names (cached per checkpoint within one invocation)."""
    which = which or self.flags.checkpoint
    prefix = checkpoint_files.resolve(self.workdir, which)
    if prefix is None:
      raise UserError(f'--checkpoint={which}: no checkpoint found in {self.workdir}.')
    if prefix not in self._models:
      model = self.build_model()
      checkpoint_contents.restore_model(model, prefix)
      logging.info('restored the model of %s', prefix)
      self._models = {prefix: model}
    return self._models[prefix], prefix

  def build_model(self):
    """The model of the flags; UserError naming the problem if the flags describe none (e.g.
    more levels than the image size allows)."""
    try:
      return tfflows.build_model(self.config)
    except ValueError as error:
      raise UserError(f'model flags: {_one_line(error)}') from None


# ------------------------------------------------------------------------------- checks
def _flow_config(f):
  """The FlowConfig of the model flags; image_shape defaults to the dataset's."""
  values = train_flags.model_field_values(f)
  shape = pipeline.dataset_info(f.dataset)[0]
  if not values['image_shape']:
    values['image_shape'] = tuple(shape)
  elif tuple(values['image_shape']) != tuple(shape):
    raise app.UsageError(f'--image_shape={",".join(map(str, values["image_shape"]))} does not '
                         f'match --dataset={f.dataset}, whose images are '
                         f'{",".join(map(str, shape))}.')
  try:
    return tfflows.FlowConfig(**values)
  except ValueError as error:
    raise app.UsageError(f'model flags: {error}') from None


def check_writable_dir(path, flag, subdirs=()):
  """Raises app.UsageError naming --flag unless ``path`` is a directory this process can write
  (or can be created as one): a file there is refused, and a test file is written and deleted
  in it (or in its nearest existing parent), so a read-only or full file system is found
  before any compute. Existing ``subdirs`` of it are tested too."""
  path = os.path.abspath(os.fspath(path))
  existing = path
  while not os.path.isdir(existing):
    if os.path.lexists(existing):
      what = f'--{flag}={path} is' if existing == path else f'--{flag}={path}: {existing} is'
      raise app.UsageError(f'{what} a file, not a directory.')
    existing = os.path.dirname(existing)
  candidates = [existing] + [os.path.join(path, d) for d in subdirs
                             if os.path.isdir(os.path.join(path, d))]
  for directory in candidates:
    try:
      fd, tmp = tempfile.mkstemp(prefix='.write_test.', suffix='.tmp', dir=directory)
      try:
        os.write(fd, b'\0' * 4096)
      finally:
        os.close(fd)
        os.remove(tmp)
    except OSError as error:
      raise app.UsageError(f'cannot write {directory}: {error.strerror} (--{flag}={path}).') \
          from None


def _temperatures(f):
  temperatures = [float(t) for t in f.temperatures]
  if not all(math.isfinite(t) for t in temperatures):
    raise app.UsageError(f'--temperatures={",".join(f.temperatures)}: every temperature must be '
                         'a finite number >= 0.')
  return temperatures


def _one_line(error):
  return ' '.join(str(error).split())


def _check_combinations(f):
  if f.mixed_precision and not tf.config.list_physical_devices('GPU'):
    raise app.UsageError('--mixed_precision needs a GPU: this machine has none (float16 on CPU '
                         'is emulated and slower than float32). Drop --mixed_precision.')
  if f.strategy == 'multiworker' and not os.environ.get('TF_CONFIG'):
    logging.warning('--strategy=multiworker without TF_CONFIG: a single worker.')
  if f.num_cpu_devices > 1 and tf.config.list_physical_devices('GPU') and \
      f.strategy == 'mirrored':
    logging.warning('--num_cpu_devices with GPUs present: MirroredStrategy uses the GPUs.')
  if f.init_from and os.path.abspath(f.init_from).rstrip('/') in (
      os.path.abspath(f.workdir), os.path.join(os.path.abspath(f.workdir), 'checkpoints')):
    raise app.UsageError('--init_from names --workdir itself; rerunning resumes anyway. Give '
                         'the workdir of the run to fine-tune from.')
  if f.init_from and checkpoint_files.find_checkpoint(f.init_from) is None:
    raise app.UsageError(f'--init_from={f.init_from}: no checkpoint there (give a workdir, '
                         'WORKDIR/best, or a checkpoint prefix).')
