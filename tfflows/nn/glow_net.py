"""Glow's coupling network (Kingma & Dhariwal 2018), as the reference code builds it.

For an input x [B, H, W, C_in]:

    h1 = ReLU(ActNorm(conv3x3(x)  -> width))
    h2 = ReLU(ActNorm(conv1x1(h1) -> width))
    y  = ZeroConv2D(h2)   -> out_channels      (3x3, zero-initialised, learned output scale)

The two hidden convolutions have no bias and kernels drawn from N(0, 0.05^2); each is followed
by an ActNorm (``tfflows.nn.actnorm.ActNormLayer``: per-channel loc and log-scale, initialised
from the first training batch so that its output has zero mean and unit variance per channel).
This is the network of the reference Glow code (openai/glow, ``model.py``: ``conv2d`` with
``actnorm``) and of mAR-SCF's (visinf/mar-scf, ``flow_modules/affine_coupling.py``:
``NN_net``), whose learning curve tfflows' mAR-SCF follows with it
(docs/official_comparison.md). Because the last conv is zero-initialised, y == 0 at initialisation.
"""

import keras
import tensorflow as tf

from tfflows.nn.actnorm import ActNormLayer
from tfflows.nn.zero_conv import ZeroConv2D


def hidden_conv(width, kernel_size, name):
  """A bias-free 'same' convolution with kernel ~ N(0, 0.05^2) (Glow's ``conv2d``)."""
  return keras.layers.Conv2D(width, kernel_size, padding='same', use_bias=False,
                             kernel_initializer=keras.initializers.RandomNormal(0., 0.05),
                             name=name)


@keras.saving.register_keras_serializable(package='tfflows')
class GlowConditioner(keras.layers.Layer):
  """conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> ZeroConv2D(out, 3x3)."""

  def __init__(self, width, out_channels, **kwargs):
    super().__init__(**kwargs)
    self.width = int(width)
    self.out_channels = int(out_channels)
    self.conv_in = hidden_conv(self.width, 3, 'conv_in')
    self.norm_in = ActNormLayer(self.width, name='norm_in')
    self.conv_mid = hidden_conv(self.width, 1, 'conv_mid')
    self.norm_mid = ActNormLayer(self.width, name='norm_mid')
    self.conv_out = ZeroConv2D(self.out_channels, 3, name='conv_out')

  def build(self, input_shape):
    hidden = tuple(input_shape[:-1]) + (self.width,)
    self.conv_in.build(input_shape)
    self.conv_mid.build(hidden)
    self.conv_out.build(hidden)

  def call(self, x):
    h = tf.nn.relu(self.norm_in(self.conv_in(x)))
    h = tf.nn.relu(self.norm_mid(self.conv_mid(h)))
    return self.conv_out(h)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.out_channels,)

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, out_channels=self.out_channels)
    return config
