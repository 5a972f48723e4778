"""Random draws from either a Keras SeedGenerator (stateful, checkpointed) or a stateless
[2] int seed (deterministic: used by seeded evaluation and the serving signatures).

Replicas (``replica_rows``): under a tf.distribute strategy every replica holds the same
SeedGenerator state, so without care the R replicas of a training step would draw the same
noise for their different images. Inside ``replica_rows(r, R)`` a draw of shape [b, ...] is
instead rows [r b, (r + 1) b) of the draw of shape [R b, ...] from the same seed: the replicas
draw different noise, and together exactly the noise one device draws for the global batch of
R b images (so a step on R replicas computes the single-device step). Each replica draws R
times its own noise; that is cheap next to the flow (the noise has the size of the images).
"""

import contextlib
import threading

import keras
import tensorflow as tf

_REPLICA = threading.local()  # MirroredStrategy runs each replica's step in its own thread


@contextlib.contextmanager
def replica_rows(replica_id, num_replicas):
  """Within the block, draws of shape [b, ...] are replica ``replica_id``'s rows of the draw of
  shape [num_replicas * b, ...] (see the module doc). replica_id: int (or int32 scalar tensor)
  in [0, num_replicas); num_replicas: int >= 1 (1: draws are unchanged)."""
  if int(num_replicas) < 1:
    raise ValueError(f'num_replicas must be >= 1, got {num_replicas}.')
  previous = getattr(_REPLICA, 'rows', None)
  _REPLICA.rows = (replica_id, int(num_replicas))
  try:
    yield
  finally:
    _REPLICA.rows = previous


def uniform(shape, seed, dtype=tf.float32):
  """U(0, 1) of the given shape."""
  return _draw(_uniform, shape, seed, dtype)


def normal(shape, seed, dtype=tf.float32):
  """N(0, 1) of the given shape."""
  return _draw(_normal, shape, seed, dtype)


def _uniform(shape, seed, dtype):
  if isinstance(seed, keras.random.SeedGenerator):
    return keras.random.uniform(shape, dtype=dtype, seed=seed)
  return tf.random.stateless_uniform(shape, seed=seed, dtype=dtype)


def _normal(shape, seed, dtype):
  if isinstance(seed, keras.random.SeedGenerator):
    return keras.random.normal(shape, dtype=dtype, seed=seed)
  return tf.random.stateless_normal(shape, seed=seed, dtype=dtype)


def _draw(fn, shape, seed, dtype):
  rows = getattr(_REPLICA, 'rows', None)
  if rows is None or rows[1] == 1:
    return fn(shape, seed, dtype)
  replica, replicas = rows
  shape = tf.convert_to_tensor(shape, tf.int32)
  batch = shape[0]
  full = fn(tf.concat([[replicas * batch], shape[1:]], 0), seed, dtype)
  mine = tf.gather(tf.reshape(full, tf.concat([[replicas], shape], 0)), replica)
  return tf.reshape(mine, shape)  # the static shape of an unsharded draw
