"""Imports TensorFlow without the start-up lines that mean nothing on the machine at hand.

Every TensorFlow program on a CPU-only machine used to start with lines like

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ... (303)

(twice over: two of TensorFlow's shared libraries log before absl's C++ logging is set up).
``TF_CPP_MIN_LOG_LEVEL`` does not reach them: absl writes every message to stderr until
``absl::InitializeLog()`` runs, whatever the threshold (abseil-cpp pull request 1957), and the
cuInit failure is an error-level line. ``import_tensorflow()`` imports TensorFlow and lists the
physical devices (which is when cuInit runs) with file descriptor 2 piped through a filter that

  * applies ``TF_CPP_MIN_LOG_LEVEL`` (train.main sets 2, warnings and errors, unless the
    environment sets it) to the lines absl writes before its initialisation: at levels >= 1 it
    drops their ``I`` (info) lines and absl's notice about them;
  * drops the ``failed call to cuInit`` record when no CUDA driver library (libcuda) can be
    loaded, i.e. when no GPU can be used anyway.

Every other line passes through unchanged, and at once: the filter runs in a forked child that
forwards what it reads, so a crash during the import (an illegal instruction on an old CPU, an
abort) still shows its message. ``TF_CPP_MIN_LOG_LEVEL=0`` turns the filter off. Without
``os.fork`` (Windows), or when TensorFlow is already imported, nothing is filtered.
"""

import ctypes
import os
import re
import sys

# A record of absl's C++ log: severity letter, MMDD, time, thread id, file:line]
_RECORD = re.compile(rb'^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^ \]]+:\d+\] ')
_ABSL_NOTICE = b'WARNING: All log messages before absl::InitializeLog() is called are written'
_CUINIT = b'failed call to cuInit'


def min_log_level():
  """TF_CPP_MIN_LOG_LEVEL as an int (0 when unset or not a number)."""
  try:
    return int(os.environ.get('TF_CPP_MIN_LOG_LEVEL', '0'))
  except ValueError:
    return 0


def has_cuda_driver():
  """Whether the NVIDIA driver library loads (without it TensorFlow cannot use a GPU)."""
  for name in ('libcuda.so.1', 'libcuda.so', 'nvcuda.dll'):
    try:
      ctypes.CDLL(name)
      return True
    except OSError:
      continue
  return False


def make_line_filter(level, cuda_driver):
  """keep(line: bytes) -> bool. Filters single lines: a record's continuation lines (rare
  before absl's initialisation) are kept, so no unrelated line can be dropped with a record."""
  def keep(line):
    if line.startswith(_ABSL_NOTICE):
      return level < 1
    match = _RECORD.match(line)
    if match is None:
      return True
    if match.group(1) == b'I' and level >= 1:
      return False
    return not (_CUINIT in line and not cuda_driver)
  return keep


def _forward(read_fd, write_fd, keep):
  """The child: copies the kept lines from read_fd to write_fd, each as soon as it is complete
  (a last line without a newline at EOF too)."""
  with os.fdopen(read_fd, 'rb', buffering=0) as source:
    for line in iter(source.readline, b''):
      if keep(line):
        os.write(write_fd, line)


def import_tensorflow():
  """Imports tensorflow and lists the physical devices with the filter above on stderr.
  Returns the tensorflow module."""
  level = min_log_level()
  if 'tensorflow' in sys.modules or level < 1 or not hasattr(os, 'fork'):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf
  keep = make_line_filter(level, has_cuda_driver())
  sys.stderr.flush()
  read_fd, write_fd = os.pipe()
  child = os.fork()
  if child == 0:  # pragma: no cover (runs in the child)
    os.close(write_fd)
    try:
      _forward(read_fd, 2, keep)
    finally:
      os._exit(0)  # pylint: disable=protected-access
  os.close(read_fd)
  saved = os.dup(2)
  os.dup2(write_fd, 2)
  os.close(write_fd)
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.list_physical_devices('GPU')  # runs cuInit
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)  # closes the pipe's last write end: the child reads EOF and exits
    os.close(saved)
    os.waitpid(child, 0)
  return tf
