"""RealNVP's residual coupling network with weight normalisation and batch norm.

Used by the RealNVP / LCMA baselines (Dinh et al. 2017; Das, Abbeel & Spanos, appendix A).

Weight-normalised convolution (Salimans & Kingma 2016), for each output channel o:

    W[..., o] = g[o] * V[..., o] / ||V[..., o]||      (norm over kernel rows, cols, in-channels)
    y = conv(x; W) + b

The weights are V, g and b. g starts at 1 (each output filter has unit norm, a variance-keeping
scale like LeCun initialisation; no data-dependent initialisation), or at 0 for the
zero-initialised output layer (then W == 0 and y == b == 0 at initialisation).
``weight_norm_scales`` collects every g of a model for the L2 penalty of LCMA / RealNVP
(5e-5 * sum ||g||^2).

Residual network, for an input x [B, H, W, C_in]:

    h = WNConv3x3(x) -> width
    repeat num_blocks times (pre-activation residual block):
        h = h + WNConv3x3(ReLU(BN(WNConv3x3(ReLU(BN(h))))))
    y = ZeroWNConv3x3(ReLU(BN(h))) -> out_channels

Batch norm uses Keras' ``training`` argument: batch statistics (and moving-average updates)
when training, the moving averages otherwise.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package='tfflows')
class WeightNormConv2D(keras.layers.Layer):
  """y = conv(x; g * V / ||V||) + b, 'same' padding, stride 1; weights V, g, b."""

  def __init__(self, filters, kernel_size, use_bias=True, zero_init=False,
               kernel_initializer='glorot_uniform', eps=1e-12, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.kernel_size = int(kernel_size)
    self.use_bias = bool(use_bias)
    self.zero_init = bool(zero_init)
    self.kernel_initializer = keras.initializers.get(kernel_initializer)
    self.eps = float(eps)

  def build(self, input_shape):
    in_channels = input_shape[-1]
    if in_channels is None:
      raise ValueError(f'{self.name}: the channel axis of the input must be known, '
                       f'got shape {input_shape}.')
    k = self.kernel_size
    self.v = self.add_weight(shape=(k, k, int(in_channels), self.filters),
                             initializer=self.kernel_initializer, name='v')
    self.g = self.add_weight(shape=(self.filters,),
                             initializer='zeros' if self.zero_init else 'ones', name='g')
    self.b = (self.add_weight(shape=(self.filters,), initializer='zeros', name='b')
              if self.use_bias else None)

  @property
  def kernel(self):
    """The effective kernel W = g * V / ||V|| [k, k, C_in, filters]."""
    v = tf.convert_to_tensor(self.v)
    sq_norm = tf.reduce_sum(tf.square(v), axis=[0, 1, 2])
    return v * (self.g * tf.math.rsqrt(sq_norm + tf.cast(self.eps, v.dtype)))

  def call(self, x):
    y = tf.nn.conv2d(x, self.kernel, strides=1, padding='SAME')
    if self.b is not None:
      y = y + self.b
    return y

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.filters,)

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size, use_bias=self.use_bias,
                  zero_init=self.zero_init, eps=self.eps,
                  kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
    return config


def _keras_layers(obj, seen):
  """Yields every Keras layer reachable from obj (a layer, a tf.Module such as a bijector
  holding layers, or a list / tuple / dict of those), each once."""
  if id(obj) in seen:
    return
  seen.add(id(obj))
  if isinstance(obj, keras.layers.Layer):
    for layer in obj._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
      seen.add(id(layer))
      yield layer
  elif isinstance(obj, tf.Module):
    for sub in obj._flatten(recursive=True,  # pylint: disable=protected-access
                            predicate=lambda m: isinstance(m, keras.layers.Layer)):
      yield from _keras_layers(sub, seen)
  elif isinstance(obj, dict):
    for value in obj.values():
      yield from _keras_layers(value, seen)
  elif isinstance(obj, (list, tuple)):
    for value in obj:
      yield from _keras_layers(value, seen)


def weight_norm_scales(layer_or_model):
  """The g weights of every WeightNormConv2D inside ``layer_or_model`` (stacked [K, filters]
  for steps that run as a loop; a Keras layer or model,
  a tf.Module such as a bijector that holds layers, or a list of those), each once, in
  traversal order. Penalty: ``l2 * sum(tf.reduce_sum(tf.square(g)) for g in scales)``."""
  scales, seen_vars = [], set()

  def add(g):
    if id(g) not in seen_vars:
      seen_vars.add(id(g))
      scales.append(g)

  for layer in _keras_layers(layer_or_model, set()):
    if isinstance(layer, WeightNormConv2D) and layer.built:
      add(layer.g)
    # Steps run as a loop (bijectors.repeated.StackedWeights): the stacked g [K, filters] of
    # each template WeightNormConv2D, whose sum of squares is that of the K steps' g.
    for template in getattr(layer, 'template_layers', ()):
      for sub in template._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
        if isinstance(sub, WeightNormConv2D) and sub.built:
          add(layer.stacked(sub.g))
  return scales


@keras.saving.register_keras_serializable(package='tfflows')
class _ResidualBlock(keras.layers.Layer):
  """h + WNConv3x3(ReLU(BN(WNConv3x3(ReLU(BN(h)))))), channels unchanged."""

  def __init__(self, width, **kwargs):
    super().__init__(**kwargs)
    self.width = int(width)
    self.bn1 = keras.layers.BatchNormalization(name='bn1')
    self.conv1 = WeightNormConv2D(self.width, 3, name='conv1')
    self.bn2 = keras.layers.BatchNormalization(name='bn2')
    self.conv2 = WeightNormConv2D(self.width, 3, name='conv2')

  def build(self, input_shape):
    hidden = tuple(input_shape[:-1]) + (self.width,)
    self.bn1.build(input_shape)
    self.conv1.build(input_shape)
    self.bn2.build(hidden)
    self.conv2.build(hidden)

  def call(self, h, training=None):
    r = self.conv1(tf.nn.relu(self.bn1(h, training=training)))
    r = self.conv2(tf.nn.relu(self.bn2(r, training=training)))
    return h + r

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width)
    return config


@keras.saving.register_keras_serializable(package='tfflows')
class ResNetConditioner(keras.layers.Layer):
  """WNConv3x3 -> num_blocks residual blocks -> BN -> ReLU -> zero-init WNConv3x3."""

  def __init__(self, width, num_blocks, out_channels, **kwargs):
    super().__init__(**kwargs)
    self.width = int(width)
    self.num_blocks = int(num_blocks)
    self.out_channels = int(out_channels)
    self.conv_in = WeightNormConv2D(self.width, 3, name='conv_in')
    self.blocks = [_ResidualBlock(self.width, name=f'block_{i}') for i in range(self.num_blocks)]
    self.bn_out = keras.layers.BatchNormalization(name='bn_out')
    self.conv_out = WeightNormConv2D(self.out_channels, 3, zero_init=True, name='conv_out')

  def build(self, input_shape):
    hidden = tuple(input_shape[:-1]) + (self.width,)
    self.conv_in.build(input_shape)
    for block in self.blocks:
      block.build(hidden)
    self.bn_out.build(hidden)
    self.conv_out.build(hidden)

  def call(self, x, training=None):
    h = self.conv_in(x)
    for block in self.blocks:
      h = block(h, training=training)
    return self.conv_out(tf.nn.relu(self.bn_out(h, training=training)))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.out_channels,)

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, num_blocks=self.num_blocks, out_channels=self.out_channels)
    return config
