"""Flow++-style conditioner for MixLogCDF couplings (Ho et al. 2019; used by mAR-SCF).

Gated residual convolutions interleaved with gated multi-head self-attention over pixels.
With concat_elu(z) = concat(elu(z), elu(-z)) along channels, width w, for x [B, H, W, C_in]:

    h = conv3x3(x) -> w
    repeat num_blocks times:
        # gated residual convolution
        r = conv3x3(concat_elu(h)) -> w
        r = dropout(concat_elu(r))
        [a, b] = split(conv3x3(r) -> 2w)
        h = LayerNorm(h + a * sigmoid(b))
        # gated self-attention over the N = H*W pixel positions (tokens [B, N, w])
        s = MultiHeadAttention(h, h) -> 2w          num_heads heads, dropout on the weights
        [a, b] = split(s)
        h = LayerNorm(h + dropout(a * sigmoid(b)))
    y = conv3x3(concat_elu(h)) -> out_channels     zero-initialised kernel and bias

LayerNorm normalises over the channels of each pixel (learned scale and offset). Dropout and
the attention dropout follow Keras' ``training`` argument. No positional encoding is added
(the convolutions carry position information). y == 0 at initialisation.

Defaults: width 96, 4 heads, dropout 0.2 as stated for mAR-SCF's MixLogCDF variant. The number
of blocks is not stated there; the default 10 is taken from Flow++'s CIFAR-10 setting (to be
confirmed against the papers before relying on it).
"""

import keras
import tensorflow as tf


def concat_elu(x):
  """concat(elu(x), elu(-x)) along the channel axis: C -> 2C channels."""
  return tf.nn.elu(tf.concat([x, -x], axis=-1))


@keras.saving.register_keras_serializable(package='tfflows')
class GatedResidualConv(keras.layers.Layer):
  """LayerNorm(h + a * sigmoid(b)), [a, b] = conv3x3(dropout(concat_elu(conv3x3(concat_elu(h)))))."""

  def __init__(self, width, dropout=0.0, **kwargs):
    super().__init__(**kwargs)
    self.width = int(width)
    self.dropout_rate = float(dropout)
    self.conv1 = keras.layers.Conv2D(self.width, 3, padding='same', name='conv1')
    self.dropout = keras.layers.Dropout(self.dropout_rate)
    self.conv2 = keras.layers.Conv2D(2 * self.width, 3, padding='same', name='conv2')
    self.norm = keras.layers.LayerNormalization(axis=-1, name='layer_norm')

  def build(self, input_shape):
    spatial = tuple(input_shape[:-1])
    self.conv1.build(spatial + (2 * self.width,))
    self.conv2.build(spatial + (2 * self.width,))
    self.norm.build(spatial + (self.width,))

  def call(self, h, training=None):
    r = self.conv1(concat_elu(h))
    r = self.dropout(concat_elu(r), training=training)
    a, b = tf.split(self.conv2(r), 2, axis=-1)
    return self.norm(h + a * tf.sigmoid(b))

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, dropout=self.dropout_rate)
    return config


@keras.saving.register_keras_serializable(package='tfflows')
class GatedSelfAttention(keras.layers.Layer):
  """LayerNorm(h + dropout(a * sigmoid(b))), [a, b] = MultiHeadAttention(h, h) -> 2 * width,
  attention over the H*W pixel positions of h [B, H, W, width]."""

  def __init__(self, width, num_heads=4, dropout=0.0, **kwargs):
    super().__init__(**kwargs)
    self.width = int(width)
    self.num_heads = int(num_heads)
    self.dropout_rate = float(dropout)
    if self.width % self.num_heads:
      raise ValueError(f'width={self.width} is not divisible by num_heads={self.num_heads}.')
    self.attention = keras.layers.MultiHeadAttention(
        self.num_heads, self.width // self.num_heads, dropout=self.dropout_rate,
        output_shape=2 * self.width, name='attention')
    self.dropout = keras.layers.Dropout(self.dropout_rate)
    self.norm = keras.layers.LayerNormalization(axis=-1, name='layer_norm')

  def build(self, input_shape):
    if len(input_shape) != 4 or any(s is None for s in input_shape[1:]):
      raise ValueError(f'{self.name}: expected an input [B, H, W, C] with static H, W, C, '
                       f'got shape {input_shape}.')
    tokens = (None, input_shape[1] * input_shape[2], self.width)
    self.attention.build(tokens, tokens)
    self.norm.build(tuple(input_shape[:-1]) + (self.width,))

  def call(self, h, training=None):
    _, height, width, channels = h.shape
    seq = tf.reshape(h, [-1, height * width, channels])
    s = self.attention(seq, seq, training=training)
    a, b = tf.split(tf.reshape(s, [-1, height, width, 2 * self.width]), 2, axis=-1)
    return self.norm(h + self.dropout(a * tf.sigmoid(b), training=training))

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, num_heads=self.num_heads, dropout=self.dropout_rate)
    return config


@keras.saving.register_keras_serializable(package='tfflows')
class GatedResidualAttentionNet(keras.layers.Layer):
  """conv3x3 -> num_blocks x [GatedResidualConv, GatedSelfAttention] -> zero-init conv3x3."""

  def __init__(self, out_channels, width=96, num_blocks=10, num_heads=4, dropout=0.2,
               **kwargs):
    super().__init__(**kwargs)
    self.out_channels = int(out_channels)
    self.width = int(width)
    self.num_blocks = int(num_blocks)
    self.num_heads = int(num_heads)
    self.dropout_rate = float(dropout)
    self.conv_in = keras.layers.Conv2D(self.width, 3, padding='same', name='conv_in')
    self.blocks = []
    for i in range(self.num_blocks):
      self.blocks.append(GatedResidualConv(self.width, self.dropout_rate, name=f'conv_{i}'))
      self.blocks.append(GatedSelfAttention(self.width, self.num_heads, self.dropout_rate,
                                            name=f'attention_{i}'))
    self.conv_out = keras.layers.Conv2D(self.out_channels, 3, padding='same',
                                        kernel_initializer='zeros', bias_initializer='zeros',
                                        name='conv_out')

  def build(self, input_shape):
    hidden = tuple(input_shape[:-1]) + (self.width,)
    self.conv_in.build(input_shape)
    for block in self.blocks:
      block.build(hidden)
    self.conv_out.build(tuple(input_shape[:-1]) + (2 * self.width,))

  def call(self, x, training=None):
    h = self.conv_in(x)
    for block in self.blocks:
      h = block(h, training=training)
    return self.conv_out(concat_elu(h))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.out_channels,)

  def get_config(self):
    config = super().get_config()
    config.update(out_channels=self.out_channels, width=self.width, num_blocks=self.num_blocks,
                  num_heads=self.num_heads, dropout=self.dropout_rate)
    return config
