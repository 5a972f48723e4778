"""Room on disk for a checkpoint, checked before a run trains or writes anything.

Rule: the file system of the workdir must have at least the bytes of the values of the model's
and the optimizer's variables free (what a checkpoint of them holds, index aside), else
``atomic.WriteError`` ("cannot write DIR: No space left on device: 4.0 KiB free, a checkpoint
of this model needs ...") before anything is touched. A file system whose free space cannot be
read passes.
"""

import errno
import os
import shutil

import numpy as np
import tensorflow as tf

from tfflows import atomic


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
