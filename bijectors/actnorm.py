"""Activation normalization (Glow, Kingma & Dhariwal 2018, section 3.1).

    y = (x + loc) * exp(log_scale)                 per channel, loc and log_scale [C]
    log|det dy/dx| = H * W * sum_c log_scale_c     per event

The forward map is pure: it never changes its weights. They start at loc = 0, log_scale = 0,
so an ActNorm that has not been initialised is the identity.

Data-dependent initialisation belongs to training. Inside ``with data_initialization():``
(a Python, trace-time scope; ``FlowModel.initialize`` opens it for one pass over a real
training batch) every ActNorm whose ``initialized`` flag is 0 sets, from the statistics of its
input over every axis but the channel,

    loc = -mean(x),   log_scale = -log(std(x))    if std(x) >= min_std
                      log_scale = 0               otherwise (the channel is only centred)

assigns them with ``variable.assign`` (so a ``keras.StatelessScope`` records the assignment),
sets ``initialized`` to 1 and normalises its own output with the new values, so the next step
initialises on normalised data. A channel whose spread on the initialisation batch is below
``min_std`` (an all-black batch: only the dequantization noise, std 1/(256 sqrt 12) = 1.1e-3 on
the unit interval) carries no information about its scale; dividing by that spread would scale
it by ~900 (log-scale 6.8) and ruin training, so it is left unscaled.
``actnorm_state(model)`` counts uninitialised ActNorms and channels left unscaled.

``initialized`` is a Keras weight, so checkpoints restore it and a resumed run does not
initialise again.
"""

import contextlib
import threading

import keras
import tensorflow as tf

from bijectors import base

MIN_STD = 1e-2  # below this spread on the initialisation batch, a channel is only centred

_scope = threading.local()


@contextlib.contextmanager
def data_initialization():
  """Trace-time scope in which uninitialised ActNorms initialise from the data they see."""
  previous = in_data_initialization()
  _scope.active = True
  try:
    yield
  finally:
    _scope.active = previous


def in_data_initialization():
  """True inside ``data_initialization()`` (in the current thread)."""
  return getattr(_scope, 'active', False)


def data_statistics(x, min_std=MIN_STD):
  """(loc, log_scale) [C] that normalise x [..., C] per channel (see the module docstring)."""
  axes = list(range(x.shape.rank - 1))
  mean, var = tf.nn.moments(tf.stop_gradient(x), axes=axes)
  std = tf.sqrt(var)
  informative = std >= min_std
  log_scale = tf.where(informative, -tf.math.log(tf.where(informative, std, 1.)), 0.)
  return -mean, log_scale


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

  def actnorm_state(self):
    """(uninitialised ActNorms, channels left unscaled by the initialisation) of this layer."""
    fresh = int(float(self.initialized.numpy()) == 0.)
    unscaled = 0 if fresh else int(tf.reduce_sum(tf.cast(self.log_scale == 0., tf.int32)))
    return fresh, unscaled


class ActNorm(base.FlowBijector):
  """Per-channel affine normalisation with data-dependent initialisation in training."""

  def __init__(self, channels, min_std=MIN_STD, name='act_norm'):
    self.params = ActNormParams(channels, name=name)
    self.channels = channels  # the base class checks inputs against it
    self.min_std = min_std
    super().__init__(name=name, layers=[self.params])

  def _current_params(self, x):
    """(loc, log_scale) in x's dtype; initialises them first inside ``data_initialization``."""
    p = self.params
    if in_data_initialization():
      data_loc, data_log_scale = data_statistics(x, self.min_std)
      fresh = p.initialized <= 0.
      loc = tf.where(fresh, tf.cast(data_loc, p.loc.dtype), p.loc)
      log_scale = tf.where(fresh, tf.cast(data_log_scale, p.log_scale.dtype), p.log_scale)
      p.loc.assign(loc)
      p.log_scale.assign(log_scale)
      p.initialized.assign(tf.ones_like(p.initialized))
    else:
      loc, log_scale = p.loc, p.log_scale
    return tf.cast(loc, x.dtype), tf.cast(log_scale, x.dtype)

  def _forward_and_log_det(self, x, **unused):
    loc, log_scale = self._current_params(x)
    y = (x + loc) * tf.exp(log_scale)
    return y, base.num_pixels(x) * tf.reduce_sum(log_scale)

  def _inverse_and_log_det(self, y, **unused):
    p = self.params
    loc, log_scale = tf.cast(p.loc, y.dtype), tf.cast(p.log_scale, y.dtype)
    x = y * tf.exp(-log_scale) - loc
    return x, -base.num_pixels(y) * tf.reduce_sum(log_scale)


def actnorm_state(model):
  """(uninitialised ActNorms, channels left unscaled) over every layer of ``model`` that keeps
  ActNorm weights (any layer with an ``actnorm_state()`` method)."""
  fresh = unscaled = 0
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if hasattr(layer, 'actnorm_state'):
      f, u = layer.actnorm_state()
      fresh, unscaled = fresh + f, unscaled + u
  return fresh, unscaled
