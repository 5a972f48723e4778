"""Nystrom self-attention (Xiong et al. 2021, "Nystromformer") in two forms: the published
algorithm over pixel positions, and what DenseFlow's official code computes.

``form='published'``: tokens are the N = H * W pixel positions and features the channels; an
input x [B, H, W, C] is read as a sequence [B, N, C]. Per head (d = embed_dim / num_heads):

    [Q, K, V] = x [W_q, W_k, W_v] + [b_q, b_k, b_v]       (one 1x1 conv, C -> 3 * embed_dim)

Exact softmax attention (``exact=True``, and ``exact_softmax_attention``):

    O = softmax(Q K^T / sqrt(d)) V                         softmax over the key axis

Nystrom approximation with m landmarks (``exact=False``, the default): the landmarks are the
means of m contiguous segments of the token sequence (row-major pixel order),

    Q~_j = mean(Q[j*N/m : (j+1)*N/m]),   K~_j likewise                       [m, d]
    F = softmax(Q K~^T / sqrt(d))   [N, m]
    A = softmax(Q~ K~^T / sqrt(d))  [m, m]
    B = softmax(Q~ K^T / sqrt(d))   [m, N]
    O = F pinv(A) (B V)

where pinv is the iterative Moore-Penrose pseudo-inverse of the Nystromformer paper,

    Z_0     = A^T / (||A||_1 ||A||_inf)           (max column sum times max row sum of |A|)
    Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))

run for ``pinv_iterations`` steps (the norms are taken per matrix, i.e. per example and head).
When m == N the landmarks are the tokens themselves, F = A = B, and O = A pinv(A) A V = A V:
the exact attention (up to the convergence of the pseudo-inverse).

``form='official'`` (``official_nystrom_attention``): the computation of the module
``denseflow/nn/blocks/attention.py::NystromAttention`` of the authors' PyTorch code
(github.com/matejgrcic/DenseFlow), which produced the paper's results. One head, E = embed_dim:

    T = [W_q; W_k; W_v] x + b                   the 1x1 conv's 3E channels, laid out channel-major
                                                (PyTorch's NCHW): T[c, p], p = h W + w
    token t = entries [3E t, 3E (t + 1)) of T's flat channel-major memory, t = 0 .. N - 1:
    Q_t = its first E entries, K_t the next E, V_t the last E     [N, E] each
    Q~, K~ = segment means of Q, K (as above), divided by sqrt(N)       [m, E]
    F = softmax_0(Q K~^T)    [N, m]    softmax_0: normalised over the first axis (the tokens)
    A = softmax_0(Q~ K~^T)   [m, m]
    B = softmax_0(Q~ K^T)    [m, N]    (normalised over the landmarks)
    O = F pinv(A) (B V) + V                                              [N, E]
    y = W_o O' + b_o,  O' = O's memory read back as channel-major [E, H, W]

So a "token" is a chunk of 3E consecutive values of the channel-major tensor (for E = 24 and
16 x 16 pixels, 72 values of one or two channels), not a pixel; the softmaxes normalise over
queries (and landmarks) instead of keys; only the landmarks are scaled, by 1/sqrt(N) rather
than 1/sqrt(d); and V comes back as a residual. The paper's numbers come from this
computation, so it is DenseFlow's default (``FlowConfig.attention``); trained side by side
(docs/official_comparison.md), the published form's test figure after two epochs blew up in
two of three runs. The layer's own default is the published form.

The projections are 1x1 convolutions on the [B, H, W, C] grid (the same weights as dense layers
over the token sequence, one fused kernel each), and the three input projections share one
convolution: fewer graph ops per attention layer, which matters with 74 of them in DF-74-10.
Both convolutions have PyTorch's default initialisation (``tfflows.nn.torch_init``), as in the
official model.

Divisibility: N must be a multiple of num_landmarks; otherwise ``build`` raises a ValueError
(no padding: DenseFlow's grids 16x16, 8x8, 4x4 with 4 landmarks always divide). The depthwise
convolution skip on V of the reference Nystromformer is not included.
"""

import math

import keras
import tensorflow as tf

from tfflows.nn import torch_init

FORMS = ('official', 'published')


def exact_softmax_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v for q [..., N, d], k [..., M, d], v [..., M, d_v]."""
  scale = tf.cast(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * scale, axis=-1)
  return tf.matmul(weights, v)


def segment_means(x, num_segments):
  """Means of ``num_segments`` contiguous segments along axis -2: [B, ..., N, d] ->
  [B, ..., num_segments, d]. N must be static and divisible by num_segments."""
  n, d = x.shape[-2], x.shape[-1]
  if n % num_segments:
    raise ValueError(f'sequence length {n} is not divisible by {num_segments} segments.')
  lead = [int(s) for s in x.shape[1:-2]]
  x = tf.reshape(x, [-1] + lead + [num_segments, n // num_segments, d])
  return tf.reduce_mean(x, axis=-2)


def iterative_pinv(a, iterations):
  """Approximate Moore-Penrose pseudo-inverse of square matrices a [..., m, m] by the
  Nystromformer iteration Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z))) from
  Z_0 = A^T / (max column sum * max row sum of |A|), computed per matrix."""
  m = a.shape[-1]
  abs_a = tf.abs(a)
  max_col_sum = tf.reduce_max(tf.reduce_sum(abs_a, axis=-2), axis=-1)
  max_row_sum = tf.reduce_max(tf.reduce_sum(abs_a, axis=-1), axis=-1)
  z = tf.linalg.matrix_transpose(a) / (max_col_sum * max_row_sum)[..., None, None]
  eye = tf.eye(m, dtype=a.dtype)
  eye7, eye15, eye13 = 7. * eye, 15. * eye, 13. * eye
  for _ in range(iterations):
    az = tf.matmul(a, z)
    z = 0.25 * tf.matmul(z, eye13 - tf.matmul(az, eye15 - tf.matmul(az, eye7 - az)))
  return z


def nystrom_attention(q, k, v, num_landmarks, pinv_iterations):
  """Nystrom approximation of softmax(q k^T / sqrt(d)) v (see the module docstring);
  q, k [B, ..., N, d], v [B, ..., N, d_v] with static N divisible by num_landmarks."""
  scale = tf.cast(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  q_land = segment_means(q, num_landmarks)
  k_land = segment_means(k, num_landmarks)
  f = tf.nn.softmax(tf.matmul(q, k_land, transpose_b=True) * scale, axis=-1)        # [N, m]
  a = tf.nn.softmax(tf.matmul(q_land, k_land, transpose_b=True) * scale, axis=-1)   # [m, m]
  b = tf.nn.softmax(tf.matmul(q_land, k, transpose_b=True) * scale, axis=-1)        # [m, N]
  return tf.matmul(f, tf.matmul(iterative_pinv(a, pinv_iterations), tf.matmul(b, v)))


def official_nystrom_attention(q, k, v, num_landmarks, pinv_iterations):
  """The official DenseFlow computation on its tokens (see the module docstring, form
  'official'): F pinv(A) (B V) + V with softmaxes over axis -2 and landmarks scaled by
  1/sqrt(N); q, k, v [B, N, E] with static N divisible by num_landmarks."""
  scale = tf.cast(1.0 / math.sqrt(q.shape[-2]), q.dtype)
  q_land = segment_means(q, num_landmarks) * scale
  k_land = segment_means(k, num_landmarks) * scale
  f = _softmax_over_rows(tf.matmul(q, k_land, transpose_b=True))        # [N, m]
  a = _softmax_over_rows(tf.matmul(q_land, k_land, transpose_b=True))   # [m, m]
  b = _softmax_over_rows(tf.matmul(q_land, k, transpose_b=True))        # [m, N]
  return tf.matmul(f, tf.matmul(iterative_pinv(a, pinv_iterations), tf.matmul(b, v))) + v


def _softmax_over_rows(x):
  """softmax(x, axis=-2) with constant transpose permutations: what tf.nn.softmax does for a
  non-last axis, whose permutations it computes from the rank at run time -- inside a
  tf.while_loop (bijectors.repeated) their gradient's then reads them from the loop's
  accumulators, which XLA refuses (a permutation must be a compile-time constant)."""
  return tf.linalg.matrix_transpose(tf.nn.softmax(tf.linalg.matrix_transpose(x), axis=-1))


def channel_major_tokens(t):
  """[B, H, W, F] -> [B, H * W, F]: the channel-major (NCHW) memory of t read as H * W rows of
  F values, as ``reshape(N, H*W, F)`` of an NCHW tensor does."""
  _, h, w, f = t.shape
  return tf.reshape(tf.transpose(t, [0, 3, 1, 2]), [-1, h * w, f])


def channel_major_image(o, h, w):
  """[B, H * W, F] -> [B, H, W, F]: the inverse reading, ``reshape(N, F, H, W)`` of o's memory
  (the official model's output layout), returned channels-last."""
  f = o.shape[-1]
  return tf.transpose(tf.reshape(o, [-1, f, h, w]), [0, 2, 3, 1])


@keras.saving.register_keras_serializable(package='tfflows')
class NystromAttention(keras.layers.Layer):
  """Self-attention on [B, H, W, C] projected back to C (or ``output_channels``) channels:
  ``form='published'`` (multi-head attention over the H*W pixels, Nystrom-approximated, or
  exact with ``exact=True``) or ``'official'`` (DenseFlow's official computation, which
  DenseFlow uses by default). See the module docstring for both."""

  def __init__(self, embed_dim, num_landmarks=4, pinv_iterations=6, num_heads=1, exact=False,
               output_channels=None, form='published', **kwargs):
    super().__init__(**kwargs)
    self.embed_dim = int(embed_dim)
    self.num_landmarks = int(num_landmarks)
    self.pinv_iterations = int(pinv_iterations)
    self.num_heads = int(num_heads)
    self.exact = bool(exact)
    self.output_channels = None if output_channels is None else int(output_channels)
    self.form = form
    if form not in FORMS:
      raise ValueError(f'form={form!r} is not one of {", ".join(FORMS)}.')
    if form == 'official' and (self.num_heads != 1 or self.exact):
      raise ValueError("form='official' is the official single-head Nystrom computation: it "
                       f'takes num_heads=1 and exact=False, got num_heads={self.num_heads}, '
                       f'exact={self.exact}.')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim={self.embed_dim} is not divisible by '
                       f'num_heads={self.num_heads}.')
    self.qkv = torch_init.Conv2D(3 * self.embed_dim, 1, name='qkv')
    self.out = None

  def build(self, input_shape):
    if len(input_shape) != 4 or any(s is None for s in input_shape[1:]):
      raise ValueError(f'{self.name}: expected an input [B, H, W, C] with static H, W, C, '
                       f'got shape {input_shape}.')
    _, h, w, c = input_shape
    tokens = h * w
    if not self.exact and tokens % self.num_landmarks:
      raise ValueError(f'{self.name}: H*W = {h}*{w} = {tokens} pixels is not divisible by '
                       f'num_landmarks={self.num_landmarks}; choose a divisor of {tokens}.')
    out_channels = self.output_channels or c
    self.out = torch_init.Conv2D(out_channels, 1, name='out', dtype=self.dtype_policy)
    self.qkv.build((None, h, w, c))
    self.out.build((None, h, w, self.embed_dim))

  def _heads(self, t):
    """[B, H, W, E] -> [B, heads, N, E / heads]."""
    _, h, w, _ = t.shape
    d = self.embed_dim // self.num_heads
    if self.num_heads == 1:
      return tf.reshape(t, [-1, 1, h * w, d])
    return tf.transpose(tf.reshape(t, [-1, h * w, self.num_heads, d]), [0, 2, 1, 3])

  def _merge_heads(self, o, h, w):
    """[B, heads, N, E / heads] -> [B, H, W, E]."""
    if self.num_heads > 1:
      o = tf.transpose(o, [0, 2, 1, 3])
    return tf.reshape(o, [-1, h, w, self.embed_dim])

  def call(self, x):
    _, h, w, _ = x.shape
    if self.form == 'official':
      q, k, v = tf.split(channel_major_tokens(self.qkv(x)), 3, axis=-1)
      o = official_nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iterations)
      return self.out(channel_major_image(o, h, w))
    q, k, v = (self._heads(t) for t in tf.split(self.qkv(x), 3, axis=-1))
    if self.exact:
      o = exact_softmax_attention(q, k, v)
    else:
      o = nystrom_attention(q, k, v, self.num_landmarks, self.pinv_iterations)
    return self.out(self._merge_heads(o, h, w))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.output_channels or input_shape[-1],)

  def get_config(self):
    config = super().get_config()
    config.update(embed_dim=self.embed_dim, num_landmarks=self.num_landmarks,
                  pinv_iterations=self.pinv_iterations, num_heads=self.num_heads,
                  exact=self.exact, output_channels=self.output_channels, form=self.form)
    return config
