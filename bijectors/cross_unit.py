"""DenseFlow's dense block: invertible units joined by cross-unit coupling (Grcic et al. 2021).

A block has n units U_0 ... U_{n-1} (each a chain of Glow-like steps, see
``tfflows.models.denseflow``) and growth rate g. Its input is x_0 [B, H, W, c_0]; before every
unit but the first it draws noise e_i ~ N(0, I) [B, H, W, g] and appends g channels to the
latent, so unit i works on c_i = c_0 + i * g channels:

    y_0 = U_0(x_0)
    for i = 1 .. n-1:
        context_i        = concat(x_0, y_0, y_1, ..., y_{i-2})          (channel axis)
        (mu_i, u_i)      = g_i(context_i)                               each [B, H, W, g]
        log sigma_i      = 2 tanh(u_i / 2)                              (sigma in (e^-2, e^2))
        eta_i            = mu_i + sigma_i * e_i
        y_i              = U_i(concat(y_{i-1}, eta_i))
    output y = y_{n-1}                                                  c_0 + (n-1) g channels

    log|det d y / d(x_0, e_1, ..., e_{n-1})| = sum_i log|det dU_i| + sum_{i>=1} sum log sigma_i

The context of unit i -- *dense connectivity* -- is the channel concatenation, in this order, of
the block input x_0 and the outputs y_0, ..., y_{i-2} of every unit before the previous one:
the latents z_{<i} that precede the latent y_{i-1} being augmented (the paper's
(mu, sigma) = g_i(z_{<i})). It has i * c_0 + g (i-1)(i-2)/2 channels (c_0 for i = 1, 2 c_0 for
i = 2, 3 c_0 + g for i = 3, ...). This is the official DF-74-10 model's context, whose parameter
count (130,647,294) the builder reproduces. ``include_previous=True`` appends y_{i-1} as well
(the widest possible context; more parameters).

g_i = conv3x3 (k -> 4k, ReLU; PyTorch's default initialisation, as the official model's
``_BNReLUConv``) -> conv1x1 (4k -> 2g, zero-initialised), k = context channels;
its output is split into (mu_i, u_i) along channels, mu first. At initialisation mu = 0 and
sigma = 1, so eta_i = e_i.

The Jacobian of the joint map (x_0, e_1, ...) -> y is block-triangular: eta_i depends on e_i only
through sigma_i * e_i and on earlier variables through mu_i, sigma_i; the units are bijections of
the concatenated latent. Hence the log-det above, which ``forward_and_log_det`` returns (the
log N(e_i; 0, I) terms of the augmented likelihood belong to ``FlowModel``, not to the bijector).

Inverse: ``inverse_with_noise(y)`` runs the units backwards, peeling eta_{n-1}, ..., eta_1 off
the last g channels, which recovers x_0 and every y_i; it then recomputes the contexts and returns
e_i = (eta_i - mu_i) / sigma_i exactly, with ildj = -(forward log-det). ``inverse_and_log_det``
is the same map without the noise (generation: the noise channels are dropped).

``AugmentedChain`` composes ordinary bijectors with augmented ones (this block), routing the
flat ``noise`` list to the members that consume it; a ``multiscale.Level`` holds one.
"""

import keras
import tensorflow as tf

from bijectors import base
from tfflows.nn import torch_init
from tfflows.nn.zero_conv import zero_conv1x1


def context_channels(in_channels, growth_rate, unit, include_previous=False):
  """Channels of context_unit (unit >= 1): i c_0 + g (i-1)(i-2)/2 (+ c_0 + (i-1) g)."""
  i = int(unit)
  if i < 1:
    raise ValueError(f'unit 0 has no cross-unit coupling, got unit={unit}.')
  channels = i * in_channels + growth_rate * (i - 1) * (i - 2) // 2
  if include_previous:
    channels += in_channels + (i - 1) * growth_rate
  return channels


@keras.saving.register_keras_serializable(package='tfflows')
class CrossUnitNet(keras.layers.Layer):
  """g_i: conv3x3 (k -> 4k) -> ReLU -> zero-initialised conv1x1 (4k -> 2 growth).

  ``call(context)`` returns (mu, log_sigma), each [B, H, W, growth], log_sigma = 2 tanh(u/2).
  """

  def __init__(self, growth_rate, hidden_multiplier=4, **kwargs):
    super().__init__(**kwargs)
    self.growth_rate = int(growth_rate)
    self.hidden_multiplier = int(hidden_multiplier)
    self.hidden = None
    self.out = zero_conv1x1(2 * self.growth_rate, name='conv_out')

  def build(self, input_shape):
    channels = input_shape[-1]
    if channels is None:
      raise ValueError(f'{self.name}: the channel axis of the context must be known, '
                       f'got shape {input_shape}.')
    spatial = tuple(input_shape[:-1])
    self.hidden = torch_init.Conv2D(self.hidden_multiplier * int(channels), 3, padding='same',
                                    activation='relu', name='conv3x3', dtype=self.dtype_policy)
    self.hidden.build(input_shape)
    self.out.build(spatial + (self.hidden_multiplier * int(channels),))

  def call(self, context):
    params = self.out(self.hidden(context))
    mu, raw = params[..., :self.growth_rate], params[..., self.growth_rate:]
    return mu, 2. * tf.tanh(raw / 2.)

  def compute_output_shape(self, input_shape):
    shape = tuple(input_shape[:-1]) + (self.growth_rate,)
    return shape, shape

  def get_config(self):
    config = super().get_config()
    config.update(growth_rate=self.growth_rate, hidden_multiplier=self.hidden_multiplier)
    return config


class CrossUnitBlock(base.FlowBijector):
  """A dense block of units with cross-unit coupling (see the module docstring).

  units: n bijectors; unit i maps c_0 + i g channels to themselves. in_channels: c_0.
  growth_rate: g. spatial_shape: (H, W) of the block, for ``noise_shapes``.
  Forward takes ``noise=[e_1, ..., e_{n-1}]`` (each [B, H, W, g]).
  """

  def __init__(self, units, in_channels, growth_rate, spatial_shape, include_previous=False,
               name='cross_unit_block'):
    self.units = list(units)
    if not self.units:
      raise ValueError('a CrossUnitBlock needs at least one unit.')
    self.in_channels = int(in_channels)
    self.growth_rate = int(growth_rate)
    self.spatial_shape = tuple(int(s) for s in spatial_shape)
    self.include_previous = bool(include_previous)
    if len(self.units) > 1 and self.growth_rate < 1:
      raise ValueError(f'{name}: {len(self.units)} units need growth_rate >= 1, '
                       f'got {growth_rate}.')
    self.nets = [CrossUnitNet(self.growth_rate, name=f'{name}_cross{i}')
                 for i in range(1, len(self.units))]
    layers = [l for u in self.units for l in u.layers] + self.nets
    super().__init__(name=name, layers=layers)

  @property
  def out_channels(self):
    return self.in_channels + (len(self.units) - 1) * self.growth_rate

  @property
  def noise_shapes(self):
    """[H, W, g] for each of the n - 1 noise tensors the forward map consumes."""
    return tuple((*self.spatial_shape, self.growth_rate) for _ in self.units[1:])

  def context_channels(self, unit):
    return context_channels(self.in_channels, self.growth_rate, unit, self.include_previous)

  # -- pieces -------------------------------------------------------------------------------
  def _context(self, x0, outputs, i):
    """concat(x_0, y_0, ..., y_{i-2}) (+ y_{i-1} with include_previous) for unit i >= 1."""
    parts = [x0] + list(outputs[:i - 1])
    if self.include_previous:
      parts.append(outputs[i - 1])
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)

  def _noise_params(self, x0, outputs, i, dtype):
    mu, log_sigma = self.nets[i - 1](self._context(x0, outputs, i))
    return tf.cast(mu, dtype), tf.cast(log_sigma, dtype)

  def _check(self, x, channels, what):
    if x.shape[-1] != channels:
      raise ValueError(f'{self.name}: expected {what} with {channels} channels, '
                       f'got shape {x.shape}.')

  # -- forward / inverse --------------------------------------------------------------------
  def _forward_and_log_det(self, x, noise=(), **unused):
    noise = list(noise)
    if len(noise) != len(self.units) - 1:
      raise ValueError(f'{self.name}: expected {len(self.units) - 1} noise tensors '
                       f'(one per unit after the first), got {len(noise)}.')
    self._check(x, self.in_channels, 'an input')
    outputs, total = [], 0.
    h = x
    for i, unit in enumerate(self.units):
      if i > 0:
        e = tf.cast(noise[i - 1], x.dtype)
        self._check(e, self.growth_rate, f'noise tensor {i - 1}')
        mu, log_sigma = self._noise_params(x, outputs, i, x.dtype)
        h = tf.concat([h, mu + tf.exp(log_sigma) * e], axis=-1)
        total = total + base.sum_event(log_sigma)
      h, ldj = unit.forward_and_log_det(h)
      total = total + ldj
      outputs.append(h)
    return h, total

  def _inverse_with_noise(self, y, **unused):
    """y -> (x_0, [e_1, ..., e_{n-1}], ildj) with ildj = -forward log-det at (x_0, e)."""
    self._check(y, self.out_channels, 'an output')
    g = self.growth_rate
    outputs = [None] * len(self.units)
    etas = [None] * len(self.units)
    total = 0.
    h = y
    for i in reversed(range(len(self.units))):
      outputs[i] = h
      h, ildj = self.units[i].inverse_and_log_det(h)
      total = total + ildj
      if i > 0:
        h, etas[i] = h[..., :-g], h[..., -g:]
    x0 = h
    noise = []
    for i in range(1, len(self.units)):
      mu, log_sigma = self._noise_params(x0, outputs, i, y.dtype)
      noise.append((etas[i] - mu) * tf.exp(-log_sigma))
      total = total - base.sum_event(log_sigma)
    return x0, noise, total

  def _inverse_and_log_det(self, y, **unused):
    x0, _, ildj = self._inverse_with_noise(y)
    return x0, ildj

  # -- shapes -------------------------------------------------------------------------------
  def _forward_event_shape(self, s):
    s = tf.TensorShape(s)
    return s[:-1].concatenate([self.out_channels])

  def _inverse_event_shape(self, s):
    s = tf.TensorShape(s)
    return s[:-1].concatenate([self.in_channels])

  def _forward_event_shape_tensor(self, s):
    return tf.concat([s[:-1], tf.constant([self.out_channels], s.dtype)], 0)

  def _inverse_event_shape_tensor(self, s):
    return tf.concat([s[:-1], tf.constant([self.in_channels], s.dtype)], 0)


class AugmentedChain(base.Chain):
  """A chain whose members may consume augmentation noise (members with ``noise_shapes``).

  forward_and_log_det(x, noise=[...]) hands each augmented member its slice of the flat noise
  list, in order; inverse_with_noise(y) -> (x, noise list, ildj) collects what they recover.
  """

  def __init__(self, bijectors, name='augmented_chain'):
    super().__init__(bijectors, name=name)

  @property
  def noise_shapes(self):
    return tuple(s for b in self.bijectors for s in base.noise_shapes(b))

  def _forward_and_log_det(self, x, noise=(), **condition):
    noise = list(noise)
    if len(noise) != len(self.noise_shapes):
      raise ValueError(f'{self.name}: expected {len(self.noise_shapes)} noise tensors, '
                       f'got {len(noise)}.')
    total = 0.
    for b in self.bijectors:
      x, ldj, noise = base.forward_consuming(b, x, noise, **condition)
      total = total + ldj
    return x, total

  def _inverse_with_noise(self, y, **condition):
    noise, total = [], 0.
    for b in reversed(self.bijectors):
      y, recovered, ildj = base.inverse_recovering(b, y, **condition)
      noise = list(recovered) + noise
      total = total + ildj
    return y, noise, total

  def _inverse_and_log_det(self, y, **condition):
    x, _, ildj = self._inverse_with_noise(y, **condition)
    return x, ildj
