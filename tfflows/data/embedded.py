"""The embedded offline dataset: 5,000 real MNIST digits shipped inside the package.

`mnist5k.npz` is built by `python -m tfflows.data.make_embedded` (see that module for the
source, licence (MNIST, CC BY-SA 3.0) and the fixed 4,500 / 500 split). It is read through
`importlib.resources`, so it works from a source tree, an editable install and a regular
install alike, as long as packaging includes `tfflows/data/*.npz`.
"""

import functools
import importlib.resources
import io

import numpy as np

RESOURCE = 'mnist5k.npz'
IMAGE_SHAPE = (32, 32, 1)
SPLITS = {'train': 4500, 'test': 500}


def read_shipped_npz(name, rebuild):
  """{key: read-only array} of the .npz file ``name`` shipped in this package, read through
  ``importlib.resources`` into memory (the resource may live in a zip and not be seekable).
  rebuild: the command that writes the file, named in the FileNotFoundError raised when it is
  missing."""
  resource = importlib.resources.files(__package__) / name
  if not resource.is_file():
    raise FileNotFoundError(
        f'{name} is missing from the {__package__} package. In a source tree, run `{rebuild}`; '
        'for an install, the package data pattern `tfflows.data = *.npz` must be in setup.cfg '
        '[options.package_data].')
  with np.load(io.BytesIO(resource.read_bytes()), allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  for a in arrays.values():
    a.setflags(write=False)  # shared by every caller through the callers' caches
  return arrays


@functools.lru_cache(maxsize=1)
def _arrays():
  return read_shipped_npz(RESOURCE, 'python -m tfflows.data.make_embedded')


def load_embedded(split='train'):
  """Returns (images uint8 [N, 32, 32, 1], labels uint8 [N]) of the embedded MNIST digits.

  split: 'train' (4,500 digits) or 'test' (500). The arrays are read-only and shared;
  copy before modifying.
  """
  if split not in SPLITS:
    raise ValueError(f"mnist_embedded has splits {sorted(SPLITS)}, not {split!r}")
  arrays = _arrays()
  return arrays[f'x_{split}'], arrays[f'y_{split}']
