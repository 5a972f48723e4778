"""Variational dequantization (Ho et al. 2019, Flow++), as configured by DenseFlow.

For an image x in {0..255}^D [B, H, W, C], q(u | x) over u in (0, 1)^D is a conditional flow
from a base sample e to u, run on the squeezed [H/2, W/2, 4C] tensor:

    c      = context_net(2 x / 255 - 1)                                    [B, H/2, W/2, 64]
    e      ~ N(loc, diag(exp(log_scale))^2)   learned loc, log_scale per channel (4C each)
    h      = e
    K times:   h = W_k h                                   (invertible 1x1 conv, 'plain')
               h = coupling_k(h; c)                        (conditional affine coupling:
                     h_a = h[..., :2C] conditions, h_b = h[..., 2C:] is transformed,
                     (shift, raw) = net_k(concat(h_a, c)),
                     h_b <- h_b * exp(2 tanh(raw / 2)) + shift)
    h      = W_K h                                         (a last 1x1 conv)
    s      = unsqueeze(h)                                  [B, H, W, C]
    u      = sigmoid(s)

    log q(u | x) = log N(e; loc, scale) - log|det du/de|
                 = log N(e) - sum_k [H/2 W/2 log|det W_k|] - sum_k sum log_scale_k
                   - sum (log sigmoid(s) + log sigmoid(-s))

exactly (every map is a bijection with a closed-form log-det). ``log_prob(u, images)`` evaluates
log q at a given u by running the flow backwards (logit, squeeze, inverse convs and couplings).

Networks (DenseFlow's defaults; ``tfflows.nn.DenseBlock`` layers are
[conv1x1 c->c, ReLU, conv3x3 c->growth, ReLU], concatenated):

    context_net: DenseBlock(4 layers, growth 16) -> GatedConv1x1(64) -> conv2x2 stride 2 (64)
                 -> DenseBlock(4 layers, growth 16) -> GatedConv1x1(64)
    net_k:       conv1x1 (2C + 64 -> 64) -> h + GatedConv1x1(DenseBlock(h; 4 layers, growth 64))
                 -> zero-initialised conv1x1 (64 -> 4C: shift and raw for 2C channels)

At 32x32x3 this is 2,395,784 trainable parameters (context net 157,552; 4 coupling nets
559,372 each; five 12x12 convs; 24 base parameters): the official DF-74-10 dequantizer.

The layer has the dequantizer interface of ``FlowModel``:

    call(images_float, seed=None, midpoint=False) -> (x + u, log q(u | x) [B])

seed: a ``keras.random.SeedGenerator`` or a stateless [2] int seed (``tfflows.random``).
midpoint=True evaluates u = 1/2 (the bin centres) with its exact log q(1/2 | x), deterministic.
"""

import keras
import tensorflow as tf

from bijectors import base
from bijectors.conv1x1 import InvertibleConv1x1
from bijectors.coupling import AffineCoupling
from bijectors.squeeze import squeeze, unsqueeze
from tfflows import random
from tfflows.distributions.priors import DiagonalGaussianPrior
from tfflows.nn.dense_block import DenseBlock, GatedConv1x1
from tfflows.nn import torch_init
from tfflows.nn.precision import dtype_policy_scope
from tfflows.nn.zero_conv import zero_conv1x1


@keras.saving.register_keras_serializable(package='tfflows')
class DequantizationContext(keras.layers.Layer):
  """2x/(2^bits - 1) - 1 -> dense block -> gated conv -> conv2x2/2 -> dense block -> gated conv."""

  def __init__(self, channels=64, depth=4, growth=16, num_bits=8, **kwargs):
    super().__init__(**kwargs)
    self.channels = int(channels)
    self.depth = int(depth)
    self.growth = int(growth)
    self.num_bits = int(num_bits)
    self.block1 = DenseBlock(self.depth, self.growth, name='dense1')
    self.gate1 = GatedConv1x1(self.channels, name='gate1')
    self.down = torch_init.Conv2D(self.channels, 2, strides=2, name='down')
    self.block2 = DenseBlock(self.depth, self.growth, name='dense2')
    self.gate2 = GatedConv1x1(self.channels, name='gate2')

  def build(self, input_shape):
    b, h, w, c = input_shape
    self.block1.build((b, h, w, c))
    self.gate1.build((b, h, w, c + self.depth * self.growth))
    self.down.build((b, h, w, self.channels))
    self.block2.build((b, h // 2, w // 2, self.channels))
    self.gate2.build((b, h // 2, w // 2, self.channels + self.depth * self.growth))

  def call(self, images):
    x = 2. * images / float(2 ** self.num_bits - 1) - 1.
    h = self.gate1(self.block1(x))
    h = self.down(h)
    return self.gate2(self.block2(h))

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, depth=self.depth, growth=self.growth,
                  num_bits=self.num_bits)
    return config


@keras.saving.register_keras_serializable(package='tfflows')
class DequantizationCouplingNet(keras.layers.Layer):
  """conv1x1 -> residual [dense block -> gated conv1x1] -> zero-initialised conv1x1."""

  def __init__(self, out_channels, mid_channels=64, depth=4, growth=64, **kwargs):
    super().__init__(**kwargs)
    self.out_channels = int(out_channels)
    self.mid_channels = int(mid_channels)
    self.depth = int(depth)
    self.growth = int(growth)
    self.conv_in = torch_init.Conv2D(self.mid_channels, 1, name='conv_in')
    self.dense = DenseBlock(self.depth, self.growth, name='dense')
    self.gate = GatedConv1x1(self.mid_channels, name='gate')
    self.conv_out = zero_conv1x1(self.out_channels, name='conv_out')

  def build(self, input_shape):
    spatial = tuple(input_shape[:-1])
    self.conv_in.build(input_shape)
    self.dense.build(spatial + (self.mid_channels,))
    self.gate.build(spatial + (self.mid_channels + self.depth * self.growth,))
    self.conv_out.build(spatial + (self.mid_channels,))

  def call(self, x):
    h = self.conv_in(x)
    h = h + self.gate(self.dense(h))
    return self.conv_out(h)

  def compute_output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self.out_channels,)

  def get_config(self):
    config = super().get_config()
    config.update(out_channels=self.out_channels, mid_channels=self.mid_channels,
                  depth=self.depth, growth=self.growth)
    return config


class VariationalDequantizer(keras.layers.Layer):
  """q(u | x): a conditional flow from a learned Gaussian to (0, 1)^D (module docstring)."""

  def __init__(self, image_shape, num_steps=4, context_channels=64, context_depth=4,
               context_growth=16, mid_channels=64, depth=4, growth=64, num_bits=8,
               network_policy=None, **kwargs):
    """network_policy: None, or a Keras dtype policy name (e.g. 'mixed_bfloat16') in which the
    context and coupling networks compute; the flow, log-dets and base stay float32."""
    super().__init__(**kwargs)
    h, w, c = (int(s) for s in image_shape)
    if h % 2 or w % 2:
      raise ValueError(f'variational dequantization squeezes the image: H and W must be even, '
                       f'got image_shape {tuple(image_shape)}.')
    self.image_shape = (h, w, c)
    self.latent_shape = (h // 2, w // 2, 4 * c)
    self.num_steps = int(num_steps)
    self.context_channels = int(context_channels)
    self.network_policy = network_policy
    channels = 4 * c
    self.base = DiagonalGaussianPrior(self.latent_shape, name='base')
    self.convs = [InvertibleConv1x1(channels, parameterization='plain', name=f'conv{k}')
                  for k in range(self.num_steps + 1)]
    with dtype_policy_scope(network_policy):
      self.context_net = DequantizationContext(context_channels, context_depth, context_growth,
                                               num_bits, name='context')
      nets = [DequantizationCouplingNet(AffineCoupling.conditioner_channels(channels),
                                        mid_channels, depth, growth, name=f'net{k}')
              for k in range(self.num_steps)]
      if network_policy is not None:   # build now, while the policy is set
        self._build_networks(nets)
    self.couplings = [AffineCoupling(net, channels, mask='channel', scale_fn='exp_tanh',
                                     name=f'coupling{k}') for k, net in enumerate(nets)]
    # Keras tracks these lists of layers (the bijectors hold the weight-owning layers).
    self.param_layers = [l for b in self.convs + self.couplings for l in b.layers]

  def _build_networks(self, nets):
    h, w, c = self.latent_shape
    self.context_net.build((None,) + self.image_shape)
    for net in nets:
      net.build((None, h, w, c // 2 + self.context_channels))

  def build(self, input_shape):
    if not self.context_net.built:
      self._build_networks([coupling.conditioner for coupling in self.couplings])

  # -- the flow e -> u and back -------------------------------------------------------------
  def _flow_forward(self, e, context):
    """e -> (u, log|det du/de| [B])."""
    total = 0.
    h = e
    for conv, coupling in zip(self.convs, self.couplings):
      h, ldj = conv.forward_and_log_det(h)
      total = total + ldj
      h, ldj = coupling.forward_and_log_det(h, context=context)
      total = total + ldj
    h, ldj = self.convs[-1].forward_and_log_det(h)
    s = unsqueeze(h)
    log_det_sigmoid = base.sum_event(tf.math.log_sigmoid(s) + tf.math.log_sigmoid(-s))
    return tf.sigmoid(s), total + ldj + log_det_sigmoid

  def _flow_inverse(self, u, context):
    """u -> (e, log|det de/du| [B])."""
    s = tf.math.log(u) - tf.math.log1p(-u)
    total = -base.sum_event(tf.math.log_sigmoid(s) + tf.math.log_sigmoid(-s))
    h, ildj = self.convs[-1].inverse_and_log_det(squeeze(s))
    total = total + ildj
    for conv, coupling in reversed(list(zip(self.convs, self.couplings))):
      h, ildj = coupling.inverse_and_log_det(h, context=context)
      total = total + ildj
      h, ildj = conv.inverse_and_log_det(h)
      total = total + ildj
    return h, total

  def _check(self, images):
    if images.shape.rank != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f'{self.name}: expected images [batch, '
                       f'{", ".join(map(str, self.image_shape))}], got shape {images.shape}.')

  # -- the dequantizer interface ------------------------------------------------------------
  def call(self, images, seed=None, midpoint=False):
    """images: float [B, H, W, C] in {0..255} -> (x + u, log q(u | x) [B])."""
    self._check(images)
    if midpoint:
      u = tf.fill(tf.shape(images), tf.constant(0.5, images.dtype))
      return images + u, self.log_prob(u, images)
    context = tf.cast(self.context_net(images), images.dtype)
    dist = self.base.distribution()
    eps = random.normal(tf.concat([tf.shape(images)[:1], self.latent_shape], 0), seed,
                        images.dtype)
    loc, log_scale = (tf.cast(v, images.dtype) for v in (self.base.loc, self.base.log_scale))
    e = loc + tf.exp(log_scale) * eps
    u, log_det = self._flow_forward(e, context)
    log_q = tf.cast(dist.log_prob(e), images.dtype) - log_det
    return images + u, log_q

  def sample(self, images, seed=None):
    """(u, log q(u | x)) for float images [B, H, W, C]."""
    values, log_q = self(images, seed=seed)
    return values - images, log_q

  def log_prob(self, u, images):
    """log q(u | x) [B] for u in (0, 1)^D, by the inverse flow."""
    context = tf.cast(self.context_net(images), u.dtype)
    e, log_det = self._flow_inverse(u, context)
    return tf.cast(self.base.distribution().log_prob(e), u.dtype) + log_det

