"""The multi-scale autoregressive (mAR) prior of mAR-SCF (Bhattacharyya et al., CVPR 2020).

At a split level the latent l [B, H, W, Cl] is factored out and r [B, H, W, Cr] goes on. The
prior treats the channels of l as time steps of a convolutional LSTM:

    p(l | r) = prod_j N(l^j; mu^j, sigma^j),   (mu^j, log sigma^j) = head(LSTM_j(u_1..u_j))
    u_j = input_conv(x_j),   x_j = [l^(j-1), e],   l^0 = 0,
    e = embed(r) = conv5x5(->E)(ReLU(conv5x5(->32)(r)))

per pixel, with x_j concatenated along channels; input_conv is a k x k convolution to the
LSTM's hidden channels (k the LSTM's kernel size, no dilation) applied to every x_j. At the last
level there is no r: x_j is l^(j-1) alone (unconditional prior). head is a 3x3 conv to 2
channels; its log-scale output is bounded softly,

    log sigma = b * tanh(raw / b),   b = log_sigma_bound (4 by default: sigma in (0.018, 55)).

This is the official mAR-SCF prior (visinf/mar-scf, ``mar_prior/lstm.py::ConvSeqEncoder`` and
``corr_prior.py``): its convolutions have PyTorch's default initialisation
(``tfflows.nn.torch_init``) and its ConvLSTM PyTorch's LSTM initialisation
(``tfflows.nn.conv_lstm``), so the prior does not start exactly at N(0, I). The soft bound is
tfflows' own (the official log-scale is unbounded); it is the identity to within 1% for
|log sigma| < 0.7 and keeps a collapsing channel from producing infinite densities.

log_prob is teacher-forced: all inputs x_j are known, so the LSTM runs over the Cl channels in
one call (input convolutions in parallel, the recurrence scanned). sample draws the channels
one after another with the LSTM state carried over: Cl sequential steps,

    l^j = mu^j + temperature * sigma^j * eps^j,   eps ~ N(0, I).

A temperature tau also scales sigma in log_prob (the density of the tempered prior).
"""

import math

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from bijectors import batching
from tfflows import random
from tfflows.nn import torch_init
from tfflows.nn.conv_lstm import ConvLSTMStack

tfd = tfp.distributions

EVENT_NDIMS = 3


def marps_num_steps(num_levels, channels):
  """Sequential steps of MARPS sampling for an image with `channels` channels.

  num_levels: L, the total number of levels of the multi-scale flow INCLUDING the last,
  unsplit one (L = 3 for 32x32 images, 4 for 64x64); there are L - 1 splits.

  Derivation (seed Lemma A.1): level 1 squeezes C -> 4C and splits off l_1 with 2C channels,
  keeping r_1 with 2C; level i squeezes r_(i-1) (2^(i-1) C channels) to 2^(i+1) C and splits
  off l_i with 2^i C channels. The last level L squeezes r_(L-1) to 2^(L+1) C channels and
  models them all with an unconditional mAR prior. One sequential step per channel of each
  prior, so

      steps = sum_(i=1)^(L-1) 2^i C + 2^(L+1) C = (2^L - 2) C + 2^(L+1) C = (3 * 2^L - 2) C,

  e.g. 66 for 32x32x3 (L = 3) and 138 for 64x64x3 (L = 4).
  """
  if num_levels < 1:
    raise ValueError(f'num_levels must be >= 1, got {num_levels}')
  return (3 * 2 ** num_levels - 2) * channels


class MARPrior(keras.layers.Layer):
  """The mAR prior over l [B, H, W, channels], optionally conditioned on r [B, H, W, Cr].

  Args:
    channels, height, width: the event shape of l.
    context_channels: Cr, or None for an unconditional prior (the last level).
    hidden, num_layers, kernel_size, dilation: the ConvLSTM stack.
    embed_channels: E, the channels of embed(r).
    log_sigma_bound: soft bound b of log sigma (module docstring).
  """

  def __init__(self, channels, height, width, context_channels=None, hidden=32, num_layers=3,
               kernel_size=5, dilation=1, embed_channels=4, log_sigma_bound=4., **kwargs):
    super().__init__(**kwargs)
    self._config = dict(channels=channels, height=height, width=width,
                        context_channels=context_channels, hidden=hidden, num_layers=num_layers,
                        kernel_size=kernel_size, dilation=dilation,
                        embed_channels=embed_channels, log_sigma_bound=log_sigma_bound)
    self.channels, self.height, self.width = channels, height, width
    self.context_channels = context_channels
    self.log_sigma_bound = log_sigma_bound
    self.embed = None
    if context_channels is not None:
      self.embed = keras.Sequential([
          torch_init.Conv2D(32, 5, padding='same', activation='relu'),
          torch_init.Conv2D(embed_channels, 5, padding='same')], name='embed')
      self.embed.build((None, height, width, context_channels))
    in_channels = 1 + (0 if self.embed is None else embed_channels)
    self.input_conv = torch_init.Conv2D(hidden, kernel_size, padding='same', name='input_conv')
    self.input_conv.build((None, height, width, in_channels))
    self.lstm = ConvLSTMStack(hidden, num_layers, kernel_size, dilation, name='lstm')
    self.lstm.build((None, None, height, width, hidden))
    self.head = torch_init.Conv2D(2, 3, padding='same', name='head')
    self.head.build((None, height, width, hidden))
    self.built = True  # every weight exists now (Keras' rule: a layer whose __init__ makes them)

  def get_config(self):
    return {**super().get_config(), **self._config}

  @property
  def event_shape(self):
    return tf.TensorShape([self.height, self.width, self.channels])

  @property
  def num_sequential_steps(self):
    """Sequential LSTM steps needed to sample l: one per channel."""
    return self.channels

  def call(self, l, context=None):
    return self.log_prob(l, context)

  # -- teacher-forced density -------------------------------------------------------------
  def conditional_params(self, l, context=None):
    """(mu, log_sigma) [B, H, W, Cl] of every p(l^j | l^<j, r), in one teacher-forced pass."""
    c = self.channels
    prev = tf.concat([tf.zeros_like(l[..., :1]), l[..., :c - 1]], axis=-1)
    seq = tf.transpose(prev, [0, 3, 1, 2])[..., None]  # [B, Cl, H, W, 1]
    embedded = self._embed(context)
    if embedded is not None:
      tiled = tf.repeat(embedded[:, None], c, axis=1)
      seq = tf.concat([seq, tf.cast(tiled, seq.dtype)], axis=-1)
    seq = self.input_conv(tf.reshape(seq, [-1, self.height, self.width, seq.shape[-1]]))
    seq = tf.reshape(seq, [-1, c, self.height, self.width, seq.shape[-1]])
    out = self.lstm(seq)
    out = tf.reshape(out, [-1, self.height, self.width, out.shape[-1]])
    params = tf.reshape(self.head(out), [-1, c, self.height, self.width, 2])
    params = tf.transpose(params, [0, 2, 3, 1, 4])
    return params[..., 0], self._bound(params[..., 1])

  def log_prob(self, l, context=None, temperature=1.):
    """log p(l | context) [B], teacher-forced over all channels in one pass."""
    mu, log_sigma = self.conditional_params(l, context)
    return tf.reduce_sum(normal_log_prob(l, mu, log_sigma, temperature), axis=[-3, -2, -1])

  # -- sequential sampling -----------------------------------------------------------------
  def sample(self, context=None, batch_size=None, temperature=1., seed=None):
    """Draws l [B, H, W, Cl] channel by channel (Cl sequential steps).

    B is the batch of `context`, or `batch_size` when unconditional. seed: None (a random
    draw), an int n (reproducible: the stateless seed (0, n)) or a stateless [2] int seed
    (as TFP passes it).
    """
    embedded = self._embed(context)
    batch = self._batch(embedded, batch_size)
    shape = tf.stack([batch, self.height, self.width, self.channels])
    seed = tfp.random.sanitize_seed(None) if seed is None else random.stateless_seed(seed)
    noise = tf.random.stateless_normal(shape, seed, dtype=self.compute_dtype,
                                       alg='philox')  # same stream on CPU, GPU and XLA
    state = self.lstm.initial_state(batch, self.height, self.width)
    prev, drawn = tf.zeros_like(noise[..., :1]), []
    for j in range(self.channels):
      mu, log_sigma, state = self.step(prev, embedded, state)
      prev = mu + temperature * tf.exp(log_sigma) * noise[..., j:j + 1]
      drawn.append(prev)
    return tf.concat(drawn, axis=-1)

  def step(self, prev, embedded, state):
    """One autoregressive step: l^(j-1) [B, H, W, 1], embed(r) or None, LSTM state ->
    (mu^j, log sigma^j) [B, H, W, 1] and the new state."""
    x = prev if embedded is None else tf.concat([prev, tf.cast(embedded, prev.dtype)], -1)
    out, state = self.lstm.step(self.input_conv(x), state)
    params = self.head(out)
    return params[..., :1], self._bound(params[..., 1:]), state

  def embed_context(self, context):
    """embed(r) [B, H, W, E], or None for the unconditional prior."""
    return self._embed(context)

  # -- distribution wrapper -----------------------------------------------------------------
  def distribution(self, context=None, temperature=1., batch_size=None):
    """This prior as a tfd.Distribution with event shape [H, W, Cl].

    Batch shape: context.shape[:-3] (which may be empty), or [] when unconditional
    ([batch_size] if batch_size is given).
    """
    return MARDistribution(self, context, temperature, batch_size)

  # -- helpers -------------------------------------------------------------------------------
  def _embed(self, context):
    if (context is None) != (self.embed is None):
      raise ValueError('pass a context exactly when the prior was built with context_channels')
    return None if context is None else self.embed(context)

  def _batch(self, embedded, batch_size):
    if embedded is not None:
      return tf.shape(embedded)[0]
    if batch_size is None:
      raise ValueError('an unconditional prior needs batch_size to sample')
    return tf.convert_to_tensor(batch_size, tf.int32)

  def _bound(self, raw):
    b = self.log_sigma_bound
    return b * tf.tanh(raw / b)


def normal_log_prob(x, mu, log_sigma, temperature=1.):
  """Element-wise log N(x; mu, (temperature * sigma)^2)."""
  log_scale = log_sigma + tf.math.log(tf.cast(temperature, x.dtype))
  z = (x - mu) * tf.exp(-log_scale)
  return -0.5 * z ** 2 - log_scale - 0.5 * math.log(2. * math.pi)


class MARDistribution(tfd.Distribution):
  """A tfd.Distribution view of a MARPrior (optionally with a fixed context).

  Inputs with any number of leading dimensions (including none: TFP's joint distributions
  call factors with unbatched event-rank tensors) are folded into one batch axis for the
  layer and unfolded afterwards.
  """

  def __init__(self, prior, context=None, temperature=1., batch_size=None, name='MARPrior'):
    parameters = dict(locals())
    self._prior = prior
    self._context = None if context is None else tf.convert_to_tensor(context)
    self._temperature = temperature
    self._batch_size = batch_size
    super().__init__(dtype=tf.as_dtype(prior.compute_dtype),
                     reparameterization_type=tfd.FULLY_REPARAMETERIZED,
                     validate_args=False, allow_nan_stats=True, parameters=parameters,
                     name=name)

  @property
  def prior(self):
    return self._prior

  def _event_shape(self):
    return self._prior.event_shape

  def _event_shape_tensor(self):
    return tf.constant(self._prior.event_shape.as_list(), tf.int32)

  def _batch_shape(self):
    if self._context is not None:
      return self._context.shape[:-EVENT_NDIMS]
    return tf.TensorShape([] if self._batch_size is None else [self._batch_size])

  def _batch_shape_tensor(self):
    if self._context is not None:
      return tf.shape(self._context)[:-EVENT_NDIMS]
    return tf.constant([] if self._batch_size is None else [self._batch_size], tf.int32)

  def _log_prob(self, x):
    leading = tf.shape(x)[:-EVENT_NDIMS]
    context = None
    if self._context is not None:
      ctx_event = tf.shape(self._context)[-EVENT_NDIMS:]
      context = _fold(tf.broadcast_to(self._context, tf.concat([leading, ctx_event], 0)))
    lp = self._prior.log_prob(_fold(x), context, self._temperature)
    return tf.reshape(lp, leading)

  def _sample_n(self, n, seed=None):
    batch_shape = self._batch_shape_tensor()
    out_leading = tf.concat([[n], batch_shape], 0)
    context, batch = None, tf.reduce_prod(out_leading)
    if self._context is not None:
      ctx_event = tf.shape(self._context)[-EVENT_NDIMS:]
      context = _fold(tf.broadcast_to(self._context, tf.concat([out_leading, ctx_event], 0)))
    l = self._prior.sample(context, batch, self._temperature, seed)
    return tf.reshape(l, tf.concat([out_leading, self._event_shape_tensor()], 0))


def _fold(t):
  """[..., H, W, C] -> [N, H, W, C] (``bijectors.batching``, shared with every bijector)."""
  return batching.fold(t)[0]
