"""The files of a checkpoint directory: TensorFlow's names, the commit records, leftovers.

    DIR/ckpt-<step>.index, ckpt-<step>.data-<i>-of-<n>    one checkpoint (its *prefix* ckpt-<step>)
    DIR/checkpoint                                         the state file: the committed prefix
    best/best.json                                         best/'s commit record

Rules:

- A checkpoint exists when its index file does (TensorFlow writes the data, then the index).
- The state file is the commit record of checkpoints/: ``committed`` returns the prefix it
  names. When the directory holds checkpoints but the state file is missing, unreadable or names
  a checkpoint whose files are gone, which of them a finished save committed is unknown:
  ``CheckpointError`` names the state file and the newest checkpoint there, and nothing may be
  resumed, started or deleted.
- ``best.json`` is the commit record of best/ (``best_checkpoint``); a best/ written before it
  existed is read through its state file.
- What a killed save leaves (``checkpoint.tmp*``, ``ckpt-N_temp/``, data files without an
  index, the temporary files of ``tfflows.atomic``) is recognised by name and deleted by
  ``remove_temporary_files``.
"""

import json
import os
import re
import shutil

from google.protobuf import text_format
from tensorflow.python.checkpoint import checkpoint_management  # CheckpointState proto

from tfflows import atomic

CHECKPOINTS = 'checkpoints'
BEST = 'best'
BEST_JSON = 'best.json'
STATE = 'checkpoint'


class CheckpointError(ValueError):
  """A checkpoint, or a checkpoint state, that cannot be used; the message names the file."""


# --------------------------------------------------------------------------- names on disk
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
    raise CheckpointError(_unusable_state(directory, f'it cannot be read: {one_line(error)}'))
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


def one_line(error):
  """An exception's message on one line, at most 300 characters."""
  text = getattr(error, 'message', None) or str(error)
  return ' '.join(text.split())[:300]


# ------------------------------------------------------------------- finding checkpoints
def best_checkpoint(best_dir):
  """The checkpoint of a best/ directory: the one best.json names (its commit record), else
  the one its state file names (a best/ written before best.json was the record); None if
  none."""
  named = best_json_checkpoint(best_dir)
  if named:
    return named
  return state_checkpoint(best_dir)


def state_checkpoint(directory):
  """The checkpoint the state file names if it is readable and the checkpoint exists."""
  try:
    prefix = read_state(directory)
  except CheckpointError:
    return None
  return prefix if prefix and os.path.exists(prefix + '.index') else None


def best_json_checkpoint(best_dir):
  """The checkpoint best.json names in ``best_dir`` if its files exist, else None."""
  record = read_json(os.path.join(best_dir, BEST_JSON))
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


def read_best(path):
  """The test bits/dim recorded in a best.json (inf if there is none)."""
  record = read_json(path)
  try:
    return float(record['test_bits_per_dim'])
  except (TypeError, KeyError, ValueError):
    return float('inf')


def read_json(path):
  """The JSON value of a file; None when it is missing or not JSON."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
