"""Random draws from either a Keras SeedGenerator (stateful, checkpointed) or a stateless
[2] int seed (deterministic: used by seeded evaluation and the serving signatures)."""

import keras
import tensorflow as tf


def uniform(shape, seed, dtype=tf.float32):
  """U(0, 1) of the given shape."""
  if isinstance(seed, keras.random.SeedGenerator):
    return keras.random.uniform(shape, dtype=dtype, seed=seed)
  return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype)


def normal(shape, seed, dtype=tf.float32):
  """N(0, 1) of the given shape."""
  if isinstance(seed, keras.random.SeedGenerator):
    return keras.random.normal(shape, dtype=dtype, seed=seed)
  return tf.random.stateless_normal(shape, seed=seed, dtype=dtype)
