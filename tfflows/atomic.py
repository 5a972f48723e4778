"""Atomic file writes: a file is either the old one or the complete new one, never partial.

A write that fails (full disk, read-only directory) raises ``WriteError`` ("cannot write PATH:
No space left on device") and leaves neither a partial file nor its temporary file behind.
``write_json`` refuses NaN and Inf before writing anything: JSON has no such numbers.
"""

import errno
import json
import math
import os
import tempfile


class WriteError(OSError):
  """A file or directory could not be written; str() is one line: 'cannot write PATH: reason'."""

  def __init__(self, path, reason, code=None):
    super().__init__(code, reason, os.fspath(path))
    self.path = os.fspath(path)
    self.reason = reason

  def __str__(self):
    return f'cannot write {self.path}: {self.reason}'


def write_error(path, error):
  """A WriteError for ``path`` from an OSError or a tf.errors.OpError (whose message ends with
  the system's reason, e.g. '...tempstate123; No space left on device')."""
  if isinstance(error, WriteError):
    return error
  if isinstance(error, OSError):
    reason = error.strerror or str(error)
    return WriteError(path, reason, error.errno)
  message = getattr(error, 'message', None) or str(error)
  reason = message.split(' [Op:')[0].rsplit('; ', 1)[-1].strip()
  code = next((c for c, text in _REASONS.items() if text in message), None)
  return WriteError(path, reason, code)


_REASONS = {errno.ENOSPC: os.strerror(errno.ENOSPC), errno.EROFS: os.strerror(errno.EROFS),
            errno.EACCES: os.strerror(errno.EACCES), errno.EDQUOT: os.strerror(errno.EDQUOT)}


def write_bytes(path, data):
  """Writes ``data`` to ``path`` through a temporary file in the same directory, renamed over
  ``path`` (``os.replace`` is atomic on POSIX and Windows); creates the directory. The file is
  readable by everyone (0644), like a plain ``open(path, 'wb')``. Returns ``path``.

  Raises WriteError (an OSError) naming ``path`` if it cannot be written; the old file, if any,
  is then unchanged and no temporary file is left."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                               dir=directory)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o644)   # mkstemp creates 0600
    os.replace(tmp, path)
  except OSError as error:
    _remove_quietly(tmp)
    raise write_error(path, error) from None
  except BaseException:
    _remove_quietly(tmp)
    raise
  return path


def write_text(path, text):
  """``write_bytes`` of UTF-8 text."""
  return write_bytes(path, text.encode('utf-8'))


def write_json(path, values):
  """Writes ``values`` as JSON (sorted keys, indented) with ``write_text``.

  Raises FloatingPointError naming the file and the keys if a value is NaN or Inf (Python's
  json would write the invalid tokens NaN and Infinity); nothing is written then."""
  try:
    text = json.dumps(values, indent=2, sort_keys=True, allow_nan=False)
  except ValueError:
    raise FloatingPointError(f'refusing to write {path}: {", ".join(_non_finite_keys(values))}; '
                             'JSON cannot hold NaN or Inf.') from None
  return write_text(path, text + '\n')


def _non_finite_keys(values, prefix=''):
  found = []
  items = values.items() if isinstance(values, dict) else enumerate(values) \
      if isinstance(values, (list, tuple)) else []
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, float) and not math.isfinite(value):
      found.append(f'{name} is {value}')
    elif isinstance(value, (dict, list, tuple)):
      found.extend(_non_finite_keys(value, name + '.'))
  return found or ['a value is']


def _remove_quietly(path):
  if path and os.path.exists(path):
    try:
      os.remove(path)
    except OSError:
      pass


def is_temporary(name):
  """Whether a file name is one of write_bytes' temporary files ('.NAME.XXXX.tmp')."""
  return name.startswith('.') and name.endswith('.tmp')
