"""The precision of the coupling networks, and a scope in which Keras layers are created in it.

``conditioner_precision`` (``FlowConfig``) names the dtype the networks compute in; their
variables, the flow itself, every log-det and the priors stay float32 (Keras mixed policies):

    float32    no change
    bfloat16   Keras policy 'mixed_bfloat16'
    float16    Keras policy 'mixed_float16' (GPUs)
    auto       for DenseFlow (``tfflows.models.AUTO_PRECISION_FAMILIES``; float32 for the
               other families): bfloat16 where the hardware computes it natively, float32
               elsewhere (``auto_precision``): NVIDIA GPUs of compute capability >= 8.0
               (Ampere and later; every visible GPU must qualify, since the networks run
               there), and,
               without a GPU, CPUs with AVX512-BF16 or AMX (the 'avx512_bf16' or 'amx_bf16'
               flags of /proc/cpuinfo) when TensorFlow runs its oneDNN kernels (its default on
               such CPUs; TF_ENABLE_ONEDNN_OPTS=0 turns them off, and TensorFlow's own CPU
               kernels then compute bfloat16 50-150x slower than float32). Elsewhere bfloat16
               is emulated and slower than float32.
               Under a global Keras policy other than float32 (e.g. float64 for Jacobian
               checks) 'auto' leaves that policy alone (it resolves to 'float32': no network
               policy of its own).

A global mixed Keras policy is the Keras way to ask for the same thing:
``keras.mixed_precision.set_global_policy('mixed_bfloat16')`` (or 'mixed_float16') before
``tfflows.build_model`` makes the networks compute in bfloat16 (float16), as
conditioner_precision='bfloat16' ('float16') does, for every model family; the flow, log-dets,
priors and every variable stay float32 (``build_model`` creates all but the networks under
'float32', ``flow_policy_scope``). The two settings must agree: 'auto' takes the policy's
precision, the same precision is accepted, and a different one is a ValueError naming both.
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


def resolve_precision(precision, capabilities=None, use_hardware=True):
  """The concrete precision ('float32', 'bfloat16' or 'float16') of a configured one.

  Under a global mixed Keras policy ('mixed_bfloat16', 'mixed_float16') the policy's precision
  (see the module doc). Otherwise 'auto' gives float32 under any other global policy than
  float32 (the networks then follow that policy, e.g. float64), else ``auto_precision`` of this
  machine when ``use_hardware`` (False: float32).
  capabilities: (GPU compute capabilities, CPU flags[, oneDNN on]) for 'auto'; None reads this
    machine's.
  Raises ValueError for an unknown name, and for a precision that contradicts the global mixed
  policy."""
  if precision not in PRECISIONS:
    raise ValueError(f'conditioner_precision={precision!r} is not one of '
                     f'{", ".join(PRECISIONS)}.')
  policy = keras.config.dtype_policy()
  mixed = policy_precision(policy)
  if mixed is not None:
    if precision not in ('auto', mixed):
      raise ValueError(
          f'conditioner_precision={precision!r} contradicts the global Keras dtype policy '
          f'{policy.name!r}, whose networks compute in {mixed}: set conditioner_precision to '
          f"'auto' or {mixed!r}, or the policy to 'float32'.")
    return mixed
  if precision != 'auto':
    return precision
  if policy.name != 'float32' or not use_hardware:
    return 'float32'
  return auto_precision(*(hardware() if capabilities is None else capabilities))


def policy_precision(policy=None):
  """The network precision a mixed Keras policy asks for ('bfloat16' for 'mixed_bfloat16',
  'float16' for 'mixed_float16'); None for a policy whose variables and computations share a
  dtype (float32, float64, ...). policy: a policy or its name; None: the global policy."""
  policy = keras.config.dtype_policy() if policy is None else keras.dtype_policies.get(policy)
  if policy.compute_dtype == policy.variable_dtype:
    return None
  for precision, name in POLICIES.items():
    if name is not None and keras.dtype_policies.get(name).compute_dtype == policy.compute_dtype:
      return precision
  raise ValueError(f'Keras dtype policy {policy.name!r} computes in {policy.compute_dtype}, '
                   'which no conditioner_precision names (bfloat16, float16).')


def network_policy_name(precision):
  """The Keras policy name the networks are created under (None: leave the policy alone)."""
  return POLICIES.get(resolve_precision(precision))


def network_scope(config):
  """The dtype-policy scope in which a model's networks are created and built: that of
  ``config.conditioner_precision`` (no change for float32)."""
  return dtype_policy_scope(network_policy_name(config.conditioner_precision))


def flow_policy_scope():
  """The scope ``build_model`` builds a model in: under a global mixed policy the Keras policy
  of its variables ('float32'), so the flow, priors and dequantizer compute in float32 and only
  the networks (``network_scope``) in the mixed policy's dtype; no change under other policies.
  """
  policy = keras.config.dtype_policy()
  return dtype_policy_scope(policy.variable_dtype if policy_precision(policy) else None)


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
