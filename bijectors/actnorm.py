"""Activation normalization (Glow, Kingma & Dhariwal 2018).

    y = (x + loc) * exp(log_scale)                 per channel
    log|det dy/dx| = H * W * sum_c log_scale_c

Data-dependent initialisation: on the first forward call after construction the parameters are
set so that the first batch comes out with zero mean and unit variance per channel,
    loc = -mean(x),  log_scale = -log(std(x) + eps),
and the Keras weight ``initialized`` becomes 1. That flag is a weight, so it is saved and
restored with checkpoints and a resumed run does not initialise again. The initialisation is a
``tf.cond`` inside the graph, so it works under ``Model.fit(jit_compile=True)``.
"""

import keras
import tensorflow as tf

from bijectors import base


class ActNormParams(keras.layers.Layer):
  """Keras layer that owns ActNorm's weights: loc, log_scale [C] and the initialised flag."""

  def __init__(self, channels, **kwargs):
    super().__init__(**kwargs)
    self.channels = channels
    self.loc = self.add_weight(shape=(channels,), initializer='zeros', name='loc')
    self.log_scale = self.add_weight(shape=(channels,), initializer='zeros', name='log_scale')
    self.initialized = self.add_weight(shape=(), initializer='zeros', trainable=False,
                                       name='initialized')

  def call(self, x):  # not used: the bijector reads the weights directly
    return x


class ActNorm(base.FlowBijector):
  """Per-channel affine normalisation with data-dependent initialisation."""

  def __init__(self, channels, eps=1e-6, name='act_norm'):
    self.params = ActNormParams(channels, name=name)
    self.eps = eps
    super().__init__(name=name, layers=[self.params])

  def _initialised_params(self, x):
    p = self.params

    def data_init():
      mean, var = tf.nn.moments(tf.stop_gradient(x), axes=[0, 1, 2])
      loc = -mean
      log_scale = -tf.math.log(tf.sqrt(var) + self.eps)
      with tf.control_dependencies([p.loc.assign(loc), p.log_scale.assign(log_scale),
                                    p.initialized.assign(1.)]):
        return tf.identity(loc), tf.identity(log_scale)

    def current():
      return tf.identity(p.loc), tf.identity(p.log_scale)

    loc, log_scale = tf.cond(p.initialized > 0., current, data_init)
    # Gradients flow to the weights through the current values (the cond's data branch has none).
    return loc, log_scale

  def _forward_and_log_det(self, x, **unused):
    loc, log_scale = self._initialised_params(x)
    y = (x + loc) * tf.exp(log_scale)
    return y, base.num_pixels(x) * tf.reduce_sum(log_scale)

  def _inverse_and_log_det(self, y, **unused):
    p = self.params
    x = y * tf.exp(-p.log_scale) - p.loc
    return x, -base.num_pixels(y) * tf.reduce_sum(p.log_scale)
