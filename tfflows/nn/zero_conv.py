"""Zero-initialised convolutions: the last layer of every coupling conditioner.

Glow's ``Conv2dZeros`` (Kingma & Dhariwal 2018). For an input x [B, H, W, C_in]:

    y = (conv(x; W) + b) * exp(log_scale_factor * logs)

with kernel W [k, k, C_in, filters], bias b [filters] and per-channel log-scale logs [filters],
all initialised to zero, 'same' padding and stride 1. At initialisation y == 0, so a coupling
layer that uses y as its shift and log-scale starts as the identity. The factor
``log_scale_factor`` (3 in Glow) makes the output scale learn faster than the kernel.

``zero_conv1x1`` is the plain variant: a 1x1 ``keras.layers.Conv2D`` whose kernel and bias are
zero, y = x W + b, without the learned output scale.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package='tfflows')
class ZeroConv2D(keras.layers.Layer):
  """y = (conv(x; W) + b) * exp(log_scale_factor * logs); W, b, logs start at zero."""

  def __init__(self, filters, kernel_size=3, log_scale_factor=3.0, **kwargs):
    super().__init__(**kwargs)
    self.filters = int(filters)
    self.kernel_size = int(kernel_size)
    self.log_scale_factor = float(log_scale_factor)

  def build(self, input_shape):
    in_channels = input_shape[-1]
    if in_channels is None:
      raise ValueError(f'{self.name}: the channel axis of the input must be known, '
                       f'got shape {input_shape}.')
    k = self.kernel_size
    self.kernel = self.add_weight(shape=(k, k, int(in_channels), self.filters),
                                  initializer='zeros', name='kernel')
    self.bias = self.add_weight(shape=(self.filters,), initializer='zeros', name='bias')
    self.logs = self.add_weight(shape=(self.filters,), initializer='zeros', name='logs')

  def call(self, x):
    y = tf.nn.conv2d(x, self.kernel, strides=1, padding='SAME') + self.bias
    return y * tf.exp(self.logs * tf.cast(self.log_scale_factor, y.dtype))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.filters,)

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size,
                  log_scale_factor=self.log_scale_factor)
    return config


def zero_conv1x1(filters, name=None):
  """A 1x1 ``keras.layers.Conv2D`` to ``filters`` channels with zero kernel and zero bias."""
  return keras.layers.Conv2D(filters, 1, kernel_initializer='zeros', bias_initializer='zeros',
                             name=name)
