"""Atomic file writes (tfflows/atomic.py): the old file or the complete new one, never a partial
one; JSON never holds NaN."""

import errno
import os

import pytest

from tfflows import atomic


def test_json_never_holds_nan(tmp_path):
  path = tmp_path / 'eval.json'
  with pytest.raises(FloatingPointError,
                     match=r'refusing to write .*eval\.json: bits_per_dim_iw is nan; JSON cannot'):
    atomic.write_json(path, {'bits_per_dim_iw': float('nan'), 'k': 4})
  assert not os.listdir(tmp_path)


def test_atomic_writes_leave_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
  path = tmp_path / 'flags.txt'
  path.write_text('--old\n')
  real_fdopen = os.fdopen

  class HalfWriter:
    def __init__(self, fd, mode):
      self.file = real_fdopen(fd, mode)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.file.close()

    def write(self, data):
      self.file.write(data[:len(data) // 2])
      self.file.flush()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(atomic.os, 'fdopen', HalfWriter)
  with pytest.raises(atomic.WriteError) as error:
    atomic.write_text(path, '--new_flags_that_do_not_fit\n')
  monkeypatch.undo()
  assert str(error.value) == f'cannot write {path}: No space left on device'
  assert isinstance(error.value, OSError) and error.value.errno == errno.ENOSPC
  assert path.read_text() == '--old\n' and os.listdir(tmp_path) == ['flags.txt']
