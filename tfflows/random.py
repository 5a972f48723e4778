"""Random draws from a Keras SeedGenerator (stateful, checkpointed), a stateless [2] int seed
(one stream for the whole tensor), or one stateless seed per example ([B, 2]: example b's values
depend on its own seed only, never on the batch it is in).

    uniform(shape, seed, dtype) / normal(shape, seed, dtype)
    stateless_seed(seed)        -> [2] int32      an int n as the stateless seed (0, n)
    example_seeds(images, seed) -> [B, 2] int32   a seed per image from its content and `seed`
    fold_in(seeds, data)        -> seeds of the same shape, one new stream per value of `data`

Per-example streams are what make a seeded number a function of the image alone: the model's
seeded ``log_prob`` and the serving signature draw each image's dequantization and augmentation
noise from ``example_seeds(images, seed)``, so an image scores the same alone, anywhere in a batch
of any size, and under TF Serving's request batching.

The per-example generator is Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random
numbers: as easy as 1, 2, 3", SC 2011), the counter-based generator behind TensorFlow's own
stateless ops: block j of example b is Philox(counter=(j, 0, 0, 0), key=seed[b]), four 32-bit
words a block. It is written with elementwise integer ops (uint64 products for the 32x32->64
multiplications), so it is vectorised over the batch, runs under XLA, and gives the same bits on
every device; ``tests/test_random.py`` checks it against TensorFlow's Philox kernel bit for bit.
Uniforms take the top 24 bits of a word (float32; two words, 53 bits, for float64), normals come
from pairs of uniforms by the Box-Muller transform (as TensorFlow's stateless normal does).

Replicas (``replica_rows``): under a tf.distribute strategy every replica holds the same
SeedGenerator state, so without care the R replicas of a training step would draw the same
noise for their different images. Inside ``replica_rows(r, R)`` a SeedGenerator or [2]-seed draw
of shape [b, ...] is instead rows [r b, (r + 1) b) of the draw of shape [R b, ...] from the same
seed: the replicas draw different noise, and together exactly the noise one device draws for the
global batch of R b images (so a step on R replicas computes the single-device step). Each
replica draws R times its own noise; that is cheap next to the flow (the noise has the size of
the images). Per-example seeds need no such care: each row has its own stream.
"""

import contextlib
import math
import threading

import keras
import tensorflow as tf

# Philox-4x32 multipliers and Weyl key increments (Salmon et al. 2011, table 2).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# Keys of the content hash (fixed: changing them changes every seeded number).
_CONTENT_KEY = (0x7F4A7C15, 0x94D049BB)
_FOLD_SALT = 0xF01DF01D


# -------------------------------------------------------------------------------- Philox
def _mulhilo(a, multiplier):
  product = tf.cast(a, tf.uint64) * tf.constant(multiplier, tf.uint64)
  return (tf.cast(tf.bitwise.right_shift(product, tf.constant(32, tf.uint64)), tf.uint32),
          tf.cast(tf.bitwise.bitwise_and(product, tf.constant(_MASK32, tf.uint64)), tf.uint32))


def philox4x32(counter, key):
  """Philox-4x32-10 of uint32 tensors: counter (c0, c1, c2, c3), key (k0, k1), all
  broadcastable to one shape. Returns the four uint32 output words."""
  c0, c1, c2, c3 = (tf.convert_to_tensor(c, tf.uint32) for c in counter)
  k0, k1 = (tf.convert_to_tensor(k, tf.uint32) for k in key)
  xor = tf.bitwise.bitwise_xor
  for r in range(_ROUNDS):
    if r:
      k0 = k0 + tf.constant(_W0, tf.uint32)
      k1 = k1 + tf.constant(_W1, tf.uint32)
    hi0, lo0 = _mulhilo(c0, _M0)
    hi1, lo1 = _mulhilo(c2, _M1)
    c0, c1, c2, c3 = xor(xor(hi1, c1), k0), lo1, xor(xor(hi0, c3), k1), lo0
  return c0, c1, c2, c3


def _as_uint32(seed):
  return tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)


def _as_int32(words):
  return tf.bitcast(words, tf.int32)


def stateless_seed(seed):
  """A stateless [2] int32 seed from an int n (Python or scalar tensor: the pair (0, n); TFP
  and Keras would treat a bare int as a stateful seed) or a [2] int seed (returned as int32).
  The one conversion of the project's seeds (served log-likelihoods, prior sampling)."""
  seed = tf.convert_to_tensor(seed)
  if seed.shape.rank == 0:
    seed = tf.stack([tf.zeros([], seed.dtype), seed])
  return tf.cast(seed, tf.int32)


# ------------------------------------------------------------------------ per-example seeds
def example_seeds(images, seed):
  """[B, 2] int32 seeds, row b a function of image b's pixel values and the [2] (or scalar)
  stateless ``seed`` only.

  images: [B, ...] integer-valued images (uint8, or floats holding 0..255). The content enters
  through two multilinear hashes sum_i a_i x_i mod 2^32 with Philox-drawn coefficients a_i
  (integer sums: exact in any order, so the same for every batch size and device), which Philox
  then mixes with the seed."""
  seed = _as_uint32(stateless_seed(seed))
  images = tf.convert_to_tensor(images)
  if images.dtype.is_floating:
    images = tf.cast(tf.round(images), tf.int32)
  flat = tf.reshape(tf.bitcast(tf.cast(images, tf.int32), tf.uint32),
                    [tf.shape(images)[0], -1])                      # [B, D]
  index = tf.range(tf.shape(flat)[1], dtype=tf.int32)
  a0, a1, _, _ = philox4x32((_as_uint32(index), 0, 0, 0), _CONTENT_KEY)
  h0 = tf.reduce_sum(flat * a0[None], axis=1)
  h1 = tf.reduce_sum(flat * a1[None], axis=1)
  size = _as_uint32(tf.shape(flat)[1]) + tf.zeros_like(h0)
  k0, k1, _, _ = philox4x32((h0, h1, size, 0), (seed[0], seed[1]))
  return _as_int32(tf.stack([k0, k1], axis=1))


def fold_in(seeds, data):
  """New seeds from ``seeds`` ([2] or [N, 2]) and an int32 ``data`` (a scalar, or [N]): one
  independent stream per (seed, data) pair."""
  seeds = _as_uint32(seeds)
  data = _as_uint32(data)
  k0, k1, _, _ = philox4x32((data, _FOLD_SALT, 0, 0), (seeds[..., 0], seeds[..., 1]))
  return _as_int32(tf.stack([k0, k1], axis=-1))


def _example_words(shape, seeds, words_per_value):
  """uint32 words [B, n * words_per_value], n = prod(shape[1:]): Philox blocks of each
  example's own key, counter = block index."""
  shape = tf.convert_to_tensor(shape, tf.int32)
  count = tf.reduce_prod(shape[1:]) * words_per_value
  blocks = (count + 3) // 4
  seeds = _as_uint32(seeds)
  counter = _as_uint32(tf.range(blocks, dtype=tf.int32))[None, :]        # [1, blocks]
  words = philox4x32((counter, 0, 0, 0), (seeds[:, :1], seeds[:, 1:]))  # 4 x [B, blocks]
  words = tf.reshape(tf.stack(words, axis=-1), [shape[0], blocks * 4])
  return words[:, :count]


def _words_to_uniform(words, dtype):
  """[B, m] words -> uniforms in [0, 1): 24 bits (float32) or 53 bits from word pairs."""
  if dtype == tf.float64:
    pairs = tf.reshape(words, [tf.shape(words)[0], -1, 2])
    high = tf.cast(tf.bitwise.right_shift(pairs[..., 0], tf.constant(5, tf.uint32)), tf.float64)
    low = tf.cast(tf.bitwise.right_shift(pairs[..., 1], tf.constant(6, tf.uint32)), tf.float64)
    return (high * 2. ** 26 + low) * 2. ** -53
  top = tf.bitwise.right_shift(words, tf.constant(8, tf.uint32))
  return tf.cast(tf.cast(top, tf.float32) * 2. ** -24, dtype)


def _example_uniform(shape, seeds, dtype):
  compute = tf.float64 if dtype == tf.float64 else tf.float32
  words = _example_words(shape, seeds, 2 if compute == tf.float64 else 1)
  return tf.cast(tf.reshape(_words_to_uniform(words, compute), shape), dtype)


# Box-Muller runs on rows padded to a multiple of this many pairs, so that every value goes
# through the vectorised (SIMD) code of log, cos and sin whatever the batch size: a value in
# the scalar remainder of a tensor would differ in the last bit from the same value computed
# in a vector lane, and so an image's noise would depend on the size of its batch.
_PAIRS_ALIGN = 64


def _example_normal(shape, seeds, dtype):
  compute = tf.float64 if dtype == tf.float64 else tf.float32
  shape = tf.convert_to_tensor(shape, tf.int32)
  count = tf.reduce_prod(shape[1:])
  pairs = ((count + 1) // 2 + _PAIRS_ALIGN - 1) // _PAIRS_ALIGN * _PAIRS_ALIGN
  per_value = 2 if compute == tf.float64 else 1
  words = _example_words(tf.stack([shape[0], 2 * pairs]), seeds, per_value)
  u = tf.reshape(_words_to_uniform(words, compute), [shape[0], pairs, 2])
  radius = tf.sqrt(-2. * tf.math.log1p(-u[..., 0]))        # 1 - u in (0, 1]: finite
  angle = (2. * math.pi) * u[..., 1]
  z = tf.reshape(tf.stack([radius * tf.cos(angle), radius * tf.sin(angle)], -1),
                 [shape[0], 2 * pairs])[:, :count]
  return tf.cast(tf.reshape(z, shape), dtype)


# ---------------------------------------------------------------------------------- draws
def _per_example(seed):
  return not isinstance(seed, keras.random.SeedGenerator) and \
      tf.convert_to_tensor(seed).shape.rank == 2


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
  """U(0, 1) of the given shape. seed: a SeedGenerator, a [2] stateless seed, or [B, 2]
  per-example seeds with B = shape[0]."""
  if _per_example(seed):
    return _example_uniform(shape, seed, dtype)
  return _draw(_uniform, shape, seed, dtype)


def normal(shape, seed, dtype=tf.float32):
  """N(0, 1) of the given shape; seed as for ``uniform``."""
  if _per_example(seed):
    return _example_normal(shape, seed, dtype)
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
