"""Priors over the latents of a multi-scale flow.

Each prior is a Keras layer (it owns the weights) with one method,

    distribution(context=None, temperature=1.0) -> tfd.Distribution over an [H, W, C] event,

where ``context`` is the half that went on at the split (None for the top level, whose prior is
unconditional). The multi-scale joint distribution (``tfflows.distributions.joint``) yields these
as the factors of a ``tfd.JointDistributionCoroutine``. ``temperature`` T scales the standard
deviation: sampling at T < 1 trades diversity for quality (Glow, DenseFlow figures use 0.8).
"""

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from bijectors import batching
from tfflows.nn.zero_conv import ZeroConv2D

tfd = tfp.distributions


def diagonal_gaussian(loc, log_scale, temperature):
  """N(loc, (T exp(log_scale))^2) with the last three axes as the event."""
  scale = tf.exp(log_scale) * tf.cast(temperature, log_scale.dtype)
  return tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=3)


class StandardNormalPrior(keras.layers.Layer):
  """p(z) = N(0, I) over an [H, W, C] event; conditional use takes its batch from the context."""

  def __init__(self, event_shape, **kwargs):
    super().__init__(**kwargs)
    self.event_shape = tuple(event_shape)
    self.built = True  # no weights

  def distribution(self, context=None, temperature=1.0):
    zeros = tf.zeros(self.event_shape, self.compute_dtype)
    if context is not None:
      batch = tf.shape(context)[:-3]
      zeros = tf.zeros(tf.concat([batch, self.event_shape], 0), self.compute_dtype)
    return diagonal_gaussian(zeros, zeros, temperature)


class DiagonalGaussianPrior(keras.layers.Layer):
  """p(z) = N(mu_c, sigma_c^2): a learnable mean and log-scale per channel (DenseFlow's top)."""

  def __init__(self, event_shape, **kwargs):
    super().__init__(**kwargs)
    self.event_shape = tuple(event_shape)
    channels = self.event_shape[-1]
    self.loc = self.add_weight(shape=(channels,), initializer='zeros', name='loc')
    self.log_scale = self.add_weight(shape=(channels,), initializer='zeros', name='log_scale')
    self.built = True  # every weight exists now (Keras' rule: a layer whose __init__ makes them)

  def distribution(self, context=None, temperature=1.0):
    ones = tf.ones(self.event_shape, self.compute_dtype)
    if context is not None:
      ones = tf.ones(tf.concat([tf.shape(context)[:-3], self.event_shape], 0), self.compute_dtype)
    return diagonal_gaussian(ones * self.loc, ones * self.log_scale, temperature)


class GlowSplitPrior(keras.layers.Layer):
  """Glow's learned split prior: p(z | h) = N(mu(h), sigma(h)^2), (mu, log sigma) from a
  zero-initialised 3x3 conv over the kept half h (so it starts as N(0, I))."""

  def __init__(self, event_shape, **kwargs):
    super().__init__(**kwargs)
    self.event_shape = tuple(event_shape)
    self.conv = ZeroConv2D(2 * self.event_shape[-1])
    self.built = True  # the conv builds on its first call, or where the model builds it

  def distribution(self, context=None, temperature=1.0):
    if context is None:
      raise ValueError('GlowSplitPrior is conditional: it needs the kept half as context.')
    params = batching.apply_batched(self.conv, context)
    loc, log_scale = tf.split(params, 2, axis=-1)
    return diagonal_gaussian(loc, log_scale, temperature)
