"""Activation normalization as a Keras layer, with data-dependent initialisation (Glow, Kingma &
Dhariwal 2018, section 3.1).

    y = (x + loc) * exp(log_scale)                 per channel, loc and log_scale [C]

The layer owns the weights loc, log_scale [C] (starting at 0: an uninitialised layer is the
identity) and ``initialized`` (a non-trainable 0/1 flag). ``call`` never changes them outside
data initialisation. Two users: the ``bijectors.ActNorm`` flow step (which adds the log-det
H * W * sum_c log_scale_c) and the hidden layers of Glow's coupling network
(``tfflows.nn.GlowConditioner``), which the reference Glow and mAR-SCF code normalise this way.

Data-dependent initialisation belongs to training. Inside ``with data_initialization():``
(a Python, trace-time scope; ``FlowModel.initialize`` opens it for one pass over a real
training batch) every layer whose ``initialized`` flag is 0 sets, from the statistics of its
input over every axis but the channel,

    loc = -mean(x),   log_scale = -log(std(x))    if std(x) >= min_std
                      log_scale = 0               otherwise (the channel is only centred)

assigns them with ``variable.assign`` (so a ``keras.StatelessScope`` records the assignment),
sets ``initialized`` to 1 and normalises its own output with the new values, so the next layer
initialises on normalised data. A channel whose spread on the initialisation batch is below
``min_std`` (an all-black batch: only the dequantization noise, std 1/(256 sqrt 12) = 1.1e-3 on
the unit interval) carries no information about its scale; dividing by that spread would scale
it by ~900 (log-scale 6.8) and ruin training, so it is left unscaled.

``initialized`` is a Keras weight, so checkpoints restore it and a resumed run does not
initialise again.
"""

import contextlib
import threading

import keras
import tensorflow as tf

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


@keras.saving.register_keras_serializable(package='tfflows')
class ActNormLayer(keras.layers.Layer):
  """y = (x + loc) * exp(log_scale) per channel, initialised from data (module docstring)."""

  def __init__(self, channels, min_std=MIN_STD, **kwargs):
    super().__init__(**kwargs)
    self.channels = int(channels)
    self.min_std = float(min_std)
    self.loc = self.add_weight(shape=(self.channels,), initializer='zeros', name='loc')
    self.log_scale = self.add_weight(shape=(self.channels,), initializer='zeros',
                                     name='log_scale')
    self.initialized = self.add_weight(shape=(), initializer='zeros', trainable=False,
                                       name='initialized')

  def params(self, x):
    """(loc, log_scale) in x's dtype; initialises them from x first inside
    ``data_initialization()`` if this layer is not initialised yet."""
    loc, log_scale = self.loc, self.log_scale
    if in_data_initialization():
      data_loc, data_log_scale = data_statistics(tf.cast(x, loc.dtype), self.min_std)
      fresh = self.initialized <= 0.
      loc = tf.where(fresh, tf.cast(data_loc, loc.dtype), loc)
      log_scale = tf.where(fresh, tf.cast(data_log_scale, log_scale.dtype), log_scale)
      self.loc.assign(loc)
      self.log_scale.assign(log_scale)
      self.initialized.assign(tf.ones_like(self.initialized))
    return tf.cast(loc, x.dtype), tf.cast(log_scale, x.dtype)

  def call(self, x):
    loc, log_scale = self.params(x)
    return (x + loc) * tf.exp(log_scale)

  def actnorm_state(self):
    """(1 if uninitialised else 0, channels left unscaled by the initialisation)."""
    fresh = int(float(self.initialized.numpy()) == 0.)
    unscaled = 0 if fresh else int(tf.reduce_sum(tf.cast(self.log_scale == 0., tf.int32)))
    return fresh, unscaled

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, min_std=self.min_std)
    return config


def actnorm_state(model):
  """(uninitialised ActNorms, channels left unscaled) over every layer of ``model`` that keeps
  ActNorm weights (any layer with an ``actnorm_state()`` method: these layers, and the stacked
  weights of repeated steps, which report per step)."""
  fresh = unscaled = 0
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if hasattr(layer, 'actnorm_state'):
      f, u = layer.actnorm_state()
      fresh, unscaled = fresh + f, unscaled + u
  return fresh, unscaled
