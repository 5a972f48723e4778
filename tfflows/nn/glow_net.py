"""Glow's default coupling network (Kingma & Dhariwal 2018).

For an input x [B, H, W, C_in]:

    h1 = ReLU(conv3x3(x)  -> width)
    h2 = ReLU(conv1x1(h1) -> width)
    y  = ZeroConv2D(h2)   -> out_channels      (3x3, zero-initialised, learned output scale)

Glow puts ActNorm (without bias) after each hidden conv; this layer uses plain conv biases
instead, which has the same expressive power and no data-dependent initialisation. Because the
last conv is zero-initialised, y == 0 at initialisation.
"""

import keras

from tfflows.nn.zero_conv import ZeroConv2D


@keras.saving.register_keras_serializable(package='tfflows')
class GlowConditioner(keras.layers.Layer):
  """conv3x3(width) -> ReLU -> conv1x1(width) -> ReLU -> ZeroConv2D(out_channels, 3x3)."""

  def __init__(self, width, out_channels, **kwargs):
    super().__init__(**kwargs)
    self.width = int(width)
    self.out_channels = int(out_channels)
    self.conv_in = keras.layers.Conv2D(self.width, 3, padding='same', activation='relu',
                                       name='conv_in')
    self.conv_mid = keras.layers.Conv2D(self.width, 1, activation='relu', name='conv_mid')
    self.conv_out = ZeroConv2D(self.out_channels, 3, name='conv_out')

  def build(self, input_shape):
    hidden = tuple(input_shape[:-1]) + (self.width,)
    self.conv_in.build(input_shape)
    self.conv_mid.build(hidden)
    self.conv_out.build(hidden)

  def call(self, x):
    return self.conv_out(self.conv_mid(self.conv_in(x)))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.out_channels,)

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, out_channels=self.out_channels)
    return config
