"""The base class of every tfflows bijector.

A tfflows bijector maps in the *normalizing* direction: ``forward`` takes data towards the
latent, ``inverse`` generates. Its trainable parameters are Keras weights owned by Keras layers
that the bijector holds (``self.layers``); the bijector itself owns no variable.

Subclasses implement the two one-pass methods

    _forward_and_log_det(x)  -> (y, log|det dy/dx|)     log-det of shape [B] (or broadcastable)
    _inverse_and_log_det(y)  -> (x, log|det dx/dy|)

and the TFP methods (``forward``, ``inverse``, ``forward_log_det_jacobian``, ...) are derived
from them. The training path calls ``forward_and_log_det`` directly, so a network is evaluated
once per step; the TFP methods exist so that every piece composes with TensorFlow Probability.
"""

import tensorflow as tf
import tensorflow_probability as tfp

tfb = tfp.bijectors

EVENT_NDIMS = 3  # images: (H, W, C)


class FlowBijector(tfb.Bijector):
  """An event-rank-3 bijector whose parameters live in Keras layers."""

  def __init__(self, name, layers=(), is_constant_jacobian=False,
               forward_min_event_ndims=EVENT_NDIMS, inverse_min_event_ndims=None):
    self._keras_layers = list(layers)
    super().__init__(
        forward_min_event_ndims=forward_min_event_ndims,
        inverse_min_event_ndims=(forward_min_event_ndims if inverse_min_event_ndims is None
                                 else inverse_min_event_ndims),
        is_constant_jacobian=is_constant_jacobian,
        validate_args=False,
        parameters={},
        name=name)

  @property
  def layers(self):
    """The Keras layers that own this bijector's weights (register them with the model)."""
    return list(self._keras_layers)

  # -- the one-pass API ---------------------------------------------------------------------
  def forward_and_log_det(self, x, **condition):
    """Returns (y, fldj) with fldj of shape [B] (or broadcastable to it).

    ``condition`` holds keyword inputs of conditional bijectors (e.g. ``context=``).
    """
    return self._forward_and_log_det(x, **condition)

  def inverse_and_log_det(self, y, **condition):
    """Returns (x, ildj) with ildj of shape [B] (or broadcastable to it)."""
    return self._inverse_and_log_det(y, **condition)

  def _forward_and_log_det(self, x, **condition):
    raise NotImplementedError

  def _inverse_and_log_det(self, y, **condition):
    raise NotImplementedError

  # -- TFP methods derived from the one-pass API --------------------------------------------
  def _forward(self, x, **condition):
    return self._forward_and_log_det(x, **condition)[0]

  def _inverse(self, y, **condition):
    return self._inverse_and_log_det(y, **condition)[0]

  def _forward_log_det_jacobian(self, x, **condition):
    return _batch_log_det(self._forward_and_log_det(x, **condition)[1], x)

  def _inverse_log_det_jacobian(self, y, **condition):
    return _batch_log_det(self._inverse_and_log_det(y, **condition)[1], y)


def _batch_log_det(log_det, x):
  """Broadcasts a (possibly scalar) log-det to the batch shape of the event-rank-3 x."""
  x0 = tf.nest.flatten(x)[0]
  return log_det + tf.zeros(tf.shape(x0)[:-EVENT_NDIMS], log_det.dtype)


def sum_event(t):
  """Sums a [B, H, W, C] tensor over its event dimensions, giving [B]."""
  return tf.reduce_sum(t, axis=[-3, -2, -1])


def num_pixels(x):
  """H * W of an event-rank-3 tensor as a float, from its static shape."""
  return float(x.shape[-3] * x.shape[-2])


class Chain(FlowBijector):
  """Applies bijectors in order: forward is b_n(...b_2(b_1(x))); log-dets add up."""

  def __init__(self, bijectors, name='chain'):
    self.bijectors = list(bijectors)
    super().__init__(name=name, layers=[l for b in self.bijectors for l in b.layers])

  def _forward_and_log_det(self, x, **condition):
    total = 0.
    for b in self.bijectors:
      x, ldj = b.forward_and_log_det(x, **condition)
      total = total + ldj
    return x, total

  def _inverse_and_log_det(self, y, **condition):
    total = 0.
    for b in reversed(self.bijectors):
      y, ildj = b.inverse_and_log_det(y, **condition)
      total = total + ildj
    return y, total

  def _forward_event_shape(self, s):
    for b in self.bijectors:
      s = b.forward_event_shape(s)
    return s

  def _inverse_event_shape(self, s):
    for b in reversed(self.bijectors):
      s = b.inverse_event_shape(s)
    return s

  def _forward_event_shape_tensor(self, s):
    for b in self.bijectors:
      s = b.forward_event_shape_tensor(s)
    return s

  def _inverse_event_shape_tensor(self, s):
    for b in reversed(self.bijectors):
      s = b.inverse_event_shape_tensor(s)
    return s
