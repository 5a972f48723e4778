r"""The tfflows training program: train, evaluate, sample, interpolate and export flows.

    python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist
    python -m train.main --flagfile=configs/mnist.flags --workdir=runs/mnist --mode=eval \
        --num_importance_samples=64

--mode takes one mode or a comma list run in order (train,eval,sample,export); rerunning a
training command resumes from the workdir. Flags after --flagfile override the file's.

A problem the user can fix (a flag, a file, a full or read-only disk, a non-finite result) ends
the program with exit status 1 and one line on stderr, "train.main: error: ...", naming the
flag or file at fault; only a bug in the program shows a traceback.
"""

import errno
import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from train import quiet  # noqa: E402  pylint: disable=wrong-import-position

quiet.import_tensorflow()  # without the CUDA lines of a CPU-only machine (see train/quiet.py)

import keras  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position
from absl import app  # noqa: E402  pylint: disable=wrong-import-position
from absl import logging  # noqa: E402  pylint: disable=wrong-import-position

from tfflows import atomic  # noqa: E402  pylint: disable=wrong-import-position
from train import checkpoint_files  # noqa: E402  pylint: disable=wrong-import-position
from train import distributed  # noqa: E402  pylint: disable=wrong-import-position
from train import flags as train_flags  # noqa: E402  pylint: disable=wrong-import-position
from train import model_vetting  # noqa: E402  pylint: disable=wrong-import-position
from train import modes  # noqa: E402  pylint: disable=wrong-import-position
from train.run import Run, UserError  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = train_flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Errors that end the program with their message and exit status 1, without a traceback:
# bad flags, unusable files and checkpoints, failed writes, non-finite training or results
# (FloatingPointError: the model's NonFiniteError, and atomic.write_json's refusal of NaN).
STOPPING_ERRORS = (app.UsageError, UserError, model_vetting.NonFiniteLossError,
                   model_vetting.PoisonedWeightsError, checkpoint_files.CheckpointError,
                   atomic.WriteError, FloatingPointError)


def configure_devices(num_cpu_devices):
  """Splits the CPU into logical devices (before TensorFlow initialises its devices; a no-op
  where the CPU is split so already, as when ``main`` runs in a process that did it)."""
  if num_cpu_devices > 1:
    cpu = tf.config.list_physical_devices('CPU')[0]
    split = [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
    if tf.config.get_logical_device_configuration(cpu) != split:
      tf.config.set_logical_device_configuration(cpu, split)


def quiet_library_info():
  """Keeps the INFO records of libraries (one per checkpoint shard, ...) out of the log: INFO
  shows only from this project's packages, warnings and errors from everywhere."""
  ours = tuple(os.path.join(ROOT, package, '') for package in ('train', 'tfflows', 'bijectors'))

  def keep(record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(ours)
  logging.get_absl_handler().addFilter(keep)
  std_logging.getLogger('tensorflow').setLevel(std_logging.WARNING)


def main(argv):
  quiet_library_info()
  try:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments (not flags): {" ".join(argv[1:])}')
    configure_devices(FLAGS.num_cpu_devices)
    run = Run.from_flags(FLAGS, modes.MODES, modes.TRAINING_MODES)
    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
      tf.config.experimental.enable_op_determinism()
    for mode in run.modes:
      if mode not in distributed.ALL_WORKER_MODES and not run.is_chief:
        logging.info('--mode=%s: runs on the chief only', mode)
        continue
      logging.info('--mode=%s in %s', mode, run.workdir)
      modes.MODES[mode](run)
  except STOPPING_ERRORS as error:
    stop(error)
  except OSError as error:   # from whatever wrote or read a file, named by the error
    if error.errno in WRITE_ERRNOS:
      stop(atomic.write_error(error.filename or FLAGS.workdir, error))
    if error.errno in (errno.EACCES, errno.EPERM) and error.filename:
      stop(f'{error.filename}: {error.strerror}')
    raise


# OSErrors only a write gives, which the user can fix: full disk, quota, read-only file system.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def stop(error):
  """Ends the program: exit status 1 and one line, 'train.main: error: MESSAGE', on stderr."""
  sys.exit(f'train.main: error: {" ".join(str(error).split())}')


def parse_flags(argv):
  """absl's parser, except that --help / -h / --helpshort print the program's flags by group
  and --helpfull adds the libraries' flags, both exiting with status 0."""
  full = train_flags.help_request(argv)
  if full is not None:
    sys.stdout.write(train_flags.help_text(__doc__, full=full))
    sys.exit(0)
  return app.parse_flags_with_usage(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
