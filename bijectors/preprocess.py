"""Preprocessing bijectors: the first steps of every flow, with exact log-dets.

``ToUnitInterval`` (dequantised pixels v in [0, 256] -> x in [-0.5, 0.5]):
    forward:  x = v / 256 - 0.5
    inverse:  v = (x + 0.5) * 256
    log|det dx/dv| = -H*W*C * ln(256)

``Logit(alpha)`` (x in [-0.5, 0.5] -> y in R, RealNVP's preprocessing):
    forward:  p = alpha + (1 - 2 alpha)(x + 0.5),   y = log(p) - log(1 - p)
    inverse:  p = sigmoid(y),                       x = (p - alpha) / (1 - 2 alpha) - 0.5
    log|det dy/dx| = sum_{h,w,c} [log(1 - 2 alpha) - log(p) - log(1 - p)]
"""

import math

import tensorflow as tf

from bijectors import base

LOG_256 = math.log(256.)


def _num_dims(x):
  """H * W * C of an event-rank-3 tensor as a float, from its static shape."""
  return float(x.shape[-3] * x.shape[-2] * x.shape[-1])


class ToUnitInterval(base.FlowBijector):
  """x = v / 256 - 0.5; log-det -H*W*C*ln(256)."""

  def __init__(self, name='to_unit_interval'):
    super().__init__(name=name, is_constant_jacobian=True)

  def _forward_and_log_det(self, v, **unused):
    return v / 256. - 0.5, tf.constant(-_num_dims(v) * LOG_256, v.dtype)

  def _inverse_and_log_det(self, x, **unused):
    return (x + 0.5) * 256., tf.constant(_num_dims(x) * LOG_256, x.dtype)

  def forward_and_elementwise_log_det(self, v, **unused):
    """(x, e) with e = -ln(256) for every dimension (sums to the forward log-det)."""
    return v / 256. - 0.5, tf.fill(tf.shape(v), tf.constant(-LOG_256, v.dtype))


class Logit(base.FlowBijector):
  """y = logit(alpha + (1 - 2 alpha)(x + 0.5)) for x in [-0.5, 0.5]."""

  def __init__(self, alpha=0.05, name='logit'):
    if not 0. <= alpha < 0.5:
      raise ValueError(f'alpha must be in [0, 0.5), got {alpha}.')
    self.alpha = float(alpha)
    super().__init__(name=name)

  def _forward_and_log_det(self, x, **unused):
    p = self.alpha + (1. - 2. * self.alpha) * (x + 0.5)
    log_p, log_1mp = tf.math.log(p), tf.math.log1p(-p)
    return log_p - log_1mp, base.sum_event(self._log_dx(x) - log_p - log_1mp)

  def _inverse_and_log_det(self, y, **unused):
    p = tf.sigmoid(y)
    x = (p - self.alpha) / (1. - 2. * self.alpha) - 0.5
    log_p, log_1mp = tf.math.log_sigmoid(y), tf.math.log_sigmoid(-y)
    return x, -base.sum_event(self._log_dx(y) - log_p - log_1mp)

  def forward_and_elementwise_log_det(self, x, **unused):
    """(y, e) with e = log(1 - 2 alpha) - log(p) - log(1 - p) per dimension: the logit is
    elementwise, so e sums to the forward log-det."""
    p = self.alpha + (1. - 2. * self.alpha) * (x + 0.5)
    log_p, log_1mp = tf.math.log(p), tf.math.log1p(-p)
    return log_p - log_1mp, self._log_dx(x) - log_p - log_1mp

  def _log_dx(self, t):
    """log(1 - 2 alpha) as a tensor of t's dtype, per element (summed by the caller)."""
    return tf.constant(math.log(1. - 2. * self.alpha), t.dtype)
