"""A scope in which Keras layers are created under a given dtype policy."""

import contextlib

import keras


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
