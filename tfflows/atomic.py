"""Atomic file writes: a file is either the old one or the complete new one, never partial."""

import os
import tempfile


def write_bytes(path, data):
  """Writes ``data`` to ``path`` through a temporary file in the same directory, renamed over
  ``path`` (``os.replace`` is atomic on POSIX and Windows); creates the directory. The file is
  readable by everyone (0644), like a plain ``open(path, 'wb')``. Returns ``path``."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                             dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.chmod(tmp, 0o644)   # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
