"""DenseFlow's coupling network (Grcic, Grubisic & Segvic, "Densely connected normalizing
flows", NeurIPS 2021, and its supplementary material; the authors' PyTorch code,
https://github.com/matejgrcic/DenseFlow, for what the paper leaves open).

For an input x [B, H, W, C_in] and width w:

    h = conv1x1(x) -> w
    a = GatedConv1x1(DenseBlock(h)) -> w        dense block: w -> w + L * growth channels
    b = NystromAttention(h) -> w                 embed dim w / 2, m landmarks, pinv iterations
    u = ReLU(BatchNorm(concat(a, b)))            2w channels
    y = zero_conv1x1(conv1x1(u) -> w) -> out_channels      (the conv1x1 has no bias)

This is the official model's ``DenseNetMultihead`` with one ``MultiHeadDenseBlock``
(``denseflow/nn/nets/matching/densenet.py``, ``denseflow/nn/blocks/denseblock.py``): the same
layers, the same bias-free 2w -> w convolution, PyTorch's default initialisation of every
convolution (``tfflows.nn.torch_init``) and, with ``attention='official'`` (the default), the
attention its ``NystromAttention`` computes (``tfflows.nn.nystrom``, form 'official';
'published' is the Nystromformer algorithm over pixels). Given the same weights the two compute
the same outputs and gradients (``benchmarks/denseflow_official/equivalence_*.py``). The
official block concatenates (attention, dense), this one (dense, attention): a permutation of
the 2w channels, which batch norm and the next 1x1 conv absorb.

The final 1x1 conv has zero kernel and bias, so y == 0 at initialisation and the coupling it
drives starts as the identity. Batch norm follows Keras' ``training`` argument, with PyTorch's
defaults (the official model is PyTorch): running statistics updated with weight 0.1 per batch,
i.e. Keras momentum 0.9, and epsilon 1e-5. Keras' own momentum 0.99 leaves the statistics used
for evaluation hundreds of steps behind early in training.

Parameter count with the defaults (w = 48, 7 layers, growth 64, embed 24), C_in = 6,
out_channels = 12: 1,569,908, of which the dense block is 1,487,696 (95%; its 3x3 convs alone
968,128). The paper reports "about 1.58M" per coupling network.
"""

import keras
import tensorflow as tf

from tfflows.nn import torch_init
from tfflows.nn.dense_block import DenseBlock, GatedConv1x1
from tfflows.nn.nystrom import NystromAttention
from tfflows.nn.zero_conv import zero_conv1x1


@keras.saving.register_keras_serializable(package='tfflows')
class DenseFlowConditioner(keras.layers.Layer):
  """conv1x1 -> [DenseBlock -> GatedConv1x1 | NystromAttention] -> concat -> BN -> ReLU
  -> conv1x1 -> zero-initialised conv1x1(out_channels)."""

  def __init__(self, out_channels, width=48, dense_layers=7, dense_growth=64,
               attention_embed=None, num_landmarks=4, pinv_iterations=6, attention='official',
               **kwargs):
    super().__init__(**kwargs)
    self.out_channels = int(out_channels)
    self.width = int(width)
    self.dense_layers = int(dense_layers)
    self.dense_growth = int(dense_growth)
    self.attention_embed = (self.width // 2 if attention_embed is None
                            else int(attention_embed))
    self.num_landmarks = int(num_landmarks)
    self.pinv_iterations = int(pinv_iterations)
    self.attention_form = attention
    self.conv_in = torch_init.Conv2D(self.width, 1, name='conv_in')
    self.dense = DenseBlock(self.dense_layers, self.dense_growth, name='dense_block')
    self.gate = GatedConv1x1(self.width, name='gated_conv')
    self.attention = NystromAttention(self.attention_embed, num_landmarks=self.num_landmarks,
                                      pinv_iterations=self.pinv_iterations,
                                      output_channels=self.width, form=attention,
                                      name='attention')
    self.norm = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name='batch_norm')
    self.conv_mid = torch_init.Conv2D(self.width, 1, use_bias=False, name='conv_mid')
    self.conv_out = zero_conv1x1(self.out_channels, name='conv_out')

  def build(self, input_shape):
    spatial = tuple(input_shape[:-1])
    self.conv_in.build(input_shape)
    self.dense.build(spatial + (self.width,))
    self.gate.build(self.dense.compute_output_shape(spatial + (self.width,)))
    self.attention.build(spatial + (self.width,))
    self.norm.build(spatial + (2 * self.width,))
    self.conv_mid.build(spatial + (2 * self.width,))
    self.conv_out.build(spatial + (self.width,))

  def call(self, x, training=None):
    h = self.conv_in(x)
    local = self.gate(self.dense(h))
    glob = self.attention(h)
    u = tf.nn.relu(self.norm(tf.concat([local, glob], axis=-1), training=training))
    return self.conv_out(self.conv_mid(u))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.out_channels,)

  def get_config(self):
    config = super().get_config()
    config.update(out_channels=self.out_channels, width=self.width,
                  dense_layers=self.dense_layers, dense_growth=self.dense_growth,
                  attention_embed=self.attention_embed, num_landmarks=self.num_landmarks,
                  pinv_iterations=self.pinv_iterations, attention=self.attention_form)
    return config
