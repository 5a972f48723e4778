"""The precision of the coupling networks, and a scope in which Keras layers are created in it.

``conditioner_precision`` (``FlowConfig``) names the dtype the networks compute in; their
variables, the flow itself, every log-det and the priors stay float32 (Keras mixed policies):

    float32    no change
    bfloat16   Keras policy 'mixed_bfloat16'
    float16    Keras policy 'mixed_float16' (GPUs)
    auto       bfloat16 where the hardware computes it natively, float32 elsewhere
               (``auto_precision``): NVIDIA GPUs of compute capability >= 8.0 (Ampere and
               later; every visible GPU must qualify, since the networks run there), and,
               without a GPU, CPUs with AVX512-BF16 or AMX (the 'avx512_bf16' or 'amx_bf16'
               flags of /proc/cpuinfo) when TensorFlow runs its oneDNN kernels (its default on
               such CPUs; TF_ENABLE_ONEDNN_OPTS=0 turns them off, and TensorFlow's own CPU
               kernels then compute bfloat16 50-150x slower than float32). Elsewhere bfloat16
               is emulated and slower than float32.
               Under a global Keras policy other than float32 (e.g. float64 for Jacobian
               checks) 'auto' leaves that policy alone.
"""

import contextlib
import functools
import os

import keras
import tensorflow as tf

from tfflows.config import PRECISIONS

POLICIES = {'float32': None, 'bfloat16': 'mixed_bfloat16', 'float16': 'mixed_float16'}
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')
MIN_BF16_COMPUTE_CAPABILITY = (8, 0)


def auto_precision(gpu_compute_capabilities=(), cpu_flags=(), onednn=True):
  """'bfloat16' or 'float32' for the given hardware (a pure function; see the module doc).

  gpu_compute_capabilities: (major, minor) of every visible GPU (empty: no GPU).
  cpu_flags: the CPU's feature flags as /proc/cpuinfo spells them.
  onednn: whether TensorFlow runs its oneDNN CPU kernels (only they compute bfloat16 fast).
  """
  capabilities = [tuple(int(v) for v in c) for c in gpu_compute_capabilities]
  if capabilities:
    return ('bfloat16' if all(c >= MIN_BF16_COMPUTE_CAPABILITY for c in capabilities)
            else 'float32')
  return 'bfloat16' if onednn and set(cpu_flags) & set(BF16_CPU_FLAGS) else 'float32'


@functools.lru_cache(maxsize=None)
def hardware():
  """(GPU compute capabilities, CPU flags, oneDNN on) of this machine (flags empty where
  /proc/cpuinfo does not exist; a GPU whose capability TensorFlow does not report counts as
  (0, 0))."""
  capabilities = []
  for gpu in tf.config.list_physical_devices('GPU'):
    details = tf.config.experimental.get_device_details(gpu)
    capabilities.append(tuple(details.get('compute_capability') or (0, 0)))
  return tuple(capabilities), _cpu_flags(), _onednn_enabled()


def _onednn_enabled():
  """Whether TensorFlow runs its oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS, or TensorFlow's
  default for this CPU)."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel
    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):   # not in this TensorFlow build: read the switch
    return os.environ.get('TF_ENABLE_ONEDNN_OPTS', '1') not in ('0', 'false', 'False')


def _cpu_flags(path='/proc/cpuinfo'):
  try:
    with open(path, encoding='utf-8') as f:
      for line in f:
        if line.startswith('flags'):
          return tuple(line.split(':', 1)[1].split())
  except OSError:
    pass
  return ()


def resolve_precision(precision, capabilities=None):
  """The concrete precision ('float32', 'bfloat16' or 'float16') of a configured one.

  capabilities: (GPU compute capabilities, CPU flags[, oneDNN on]) for 'auto'; None reads this
    machine's.
  Raises ValueError for an unknown name."""
  if precision not in PRECISIONS:
    raise ValueError(f'conditioner_precision={precision!r} is not one of '
                     f'{", ".join(PRECISIONS)}.')
  if precision != 'auto':
    return precision
  if keras.config.dtype_policy().name != 'float32':
    return keras.config.dtype_policy().name
  return auto_precision(*(hardware() if capabilities is None else capabilities))


def network_policy_name(precision):
  """The Keras policy name the networks are created under (None: leave the policy alone)."""
  return POLICIES.get(resolve_precision(precision))


@contextlib.contextmanager
def dtype_policy_scope(policy):
  """Sets Keras' global dtype policy to ``policy`` (a name such as 'mixed_bfloat16') inside the
  scope and restores the previous one after; ``None`` leaves the policy alone."""
  if policy is None:
    yield
    return
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(policy)
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)
