"""Activation normalization as a flow step (Glow, Kingma & Dhariwal 2018, section 3.1).

    y = (x + loc) * exp(log_scale)                 per channel, loc and log_scale [C]
    log|det dy/dx| = H * W * sum_c log_scale_c     per event

The log-det depends on the weights but not on x, so the bijector declares
``is_constant_jacobian=True`` (TFP's contract, as the 1x1 convolution does); inside data
initialisation it reads x's statistics through ``tf.stop_gradient``, so even there it has no
gradient with respect to x.

The weights and their data-dependent initialisation (inside ``data_initialization()``, which
``FlowModel.initialize`` opens for one pass over a training batch) belong to the Keras layer
``tfflows.nn.actnorm.ActNormLayer``; see there. The forward map is pure outside that scope,
and an uninitialised ActNorm is the identity. ``actnorm_state(model)`` counts uninitialised
ActNorms and channels left unscaled.
"""

import tensorflow as tf

from bijectors import base
from tfflows.nn.actnorm import (MIN_STD, ActNormLayer, actnorm_state, data_initialization,
                                in_data_initialization)

__all__ = ['ActNorm', 'MIN_STD', 'actnorm_state', 'data_initialization',
           'in_data_initialization']


class ActNorm(base.FlowBijector):
  """Per-channel affine normalisation with data-dependent initialisation in training."""

  def __init__(self, channels, min_std=MIN_STD, name='act_norm'):
    self.params = ActNormLayer(channels, min_std=min_std, name=name)
    self.channels = channels  # the base class checks inputs against it
    super().__init__(name=name, layers=[self.params], is_constant_jacobian=True)

  def _forward_and_log_det(self, x, **unused):
    loc, log_scale = self.params.params(x)
    y = (x + loc) * tf.exp(log_scale)
    return y, base.num_pixels(x) * tf.reduce_sum(log_scale)

  def _inverse_and_log_det(self, y, **unused):
    p = self.params
    loc, log_scale = tf.cast(p.loc, y.dtype), tf.cast(p.log_scale, y.dtype)
    x = y * tf.exp(-log_scale) - loc
    return x, -base.num_pixels(y) * tf.reduce_sum(log_scale)
