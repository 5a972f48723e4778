"""DenseFlow's dense block and gated 1x1 convolution (Grcic, Grubisic & Segvic 2021).

Dense block with L layers and growth rate k, for an input h_0 = x [B, H, W, c_0]:

    c_i     = c_0 + i * k
    u_i     = ReLU(conv3x3(ReLU(conv1x1(h_i) -> c_i)) -> k)        (both convs with bias)
    h_{i+1} = concat(h_i, u_i)                                     channels c_{i+1}
    output  = h_L                                                  channels c_0 + L * k

(48 + 7 * 64 = 496 channels for DenseFlow's 48-channel input.)

Gated 1x1 convolution to F channels:

    [a, b, c] = split(conv1x1(x) -> 3F, 3 ways along channels)
    y = a + b * sigmoid(c)

Every convolution has PyTorch's default initialisation (``tfflows.nn.torch_init``), as in the
authors' code.
"""

import keras
import tensorflow as tf

from tfflows.nn import torch_init


@keras.saving.register_keras_serializable(package='tfflows')
class DenseBlock(keras.layers.Layer):
  """num_layers x [conv1x1 c->c, ReLU, conv3x3 c->growth, ReLU], each output concatenated."""

  def __init__(self, num_layers=7, growth=64, **kwargs):
    super().__init__(**kwargs)
    self.num_layers = int(num_layers)
    self.growth = int(growth)
    self.bottlenecks, self.convs = [], []

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError(f'{self.name}: the channel axis of the input must be known, '
                       f'got shape {input_shape}.')
    channels = int(channels)
    spatial = tuple(input_shape[:-1])
    for i in range(self.num_layers):   # in this layer's dtype policy, whatever is global now
      bottleneck = torch_init.Conv2D(channels, 1, activation='relu', name=f'conv1x1_{i}',
                                     dtype=self.dtype_policy)
      conv = torch_init.Conv2D(self.growth, 3, padding='same', activation='relu',
                               name=f'conv3x3_{i}', dtype=self.dtype_policy)
      bottleneck.build(spatial + (channels,))
      conv.build(spatial + (channels,))
      self.bottlenecks.append(bottleneck)
      self.convs.append(conv)
      channels += self.growth

  def call(self, x):
    h = x
    for bottleneck, conv in zip(self.bottlenecks, self.convs):
      h = tf.concat([h, conv(bottleneck(h))], axis=-1)
    return h

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (input_shape[-1] + self.num_layers * self.growth,)

  def get_config(self):
    config = super().get_config()
    config.update(num_layers=self.num_layers, growth=self.growth)
    return config


@keras.saving.register_keras_serializable(package='tfflows')
class GatedConv1x1(keras.layers.Layer):
  """y = a + b * sigmoid(c) with [a, b, c] = conv1x1(x) -> 3 * filters."""

  def __init__(self, filters, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.conv = torch_init.Conv2D(3 * self.filters, 1, name='conv')

  def build(self, input_shape):
    self.conv.build(input_shape)

  def call(self, x):
    a, b, c = tf.split(self.conv(x), 3, axis=-1)
    return a + b * tf.sigmoid(c)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.filters,)

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters)
    return config
