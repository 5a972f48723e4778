"""Affine coupling (RealNVP, Dinh et al. 2017; Glow; DenseFlow).

The input is split by a mask into a conditioning part x_a (passed through unchanged) and a
transformed part x_b; a network (the *conditioner*) sees x_a (and an optional context) and
outputs ``shift`` and ``raw`` for x_b:

    (shift, raw) = split(conditioner(x_a  [, context]))       along channels, shift first
    log_scale    = scale_fn(raw)
    forward:  y_a = x_a,   y_b = x_b * exp(log_scale) + shift
    inverse:  x_a = y_a,   x_b = (y_b - shift) * exp(-log_scale)
    log|det dy/dx| = sum over the transformed positions of log_scale

Masks (C channels, c1 = ceil(C/2), c2 = floor(C/2) = C - c1):

* ``'channel'``:  parity 0: x_a = x[..., :c1]  (first ceil(C/2)),  x_b = x[..., c1:]
                  parity 1: x_a = x[..., c2:]  (last ceil(C/2)),   x_b = x[..., :c2]
  The output keeps every channel in its place. The conditioner outputs 2 * c2 channels.
* ``'checkerboard'``: b[h, w] = (h + w + parity) % 2; positions with b = 1 condition, b = 0
  are transformed. The conditioner sees x * b (all C channels) and outputs 2 * C channels;
      y = b * x + (1 - b) * (x * exp(log_scale) + shift),
      log|det| = sum_{h,w,c} (1 - b[h, w]) * log_scale[h, w, c].

Scale functions (log_scale from the conditioner's raw output):

* ``'sigmoid'``  (Glow):      log_scale = log_sigmoid(raw + 2)        (scale in (0, 1))
* ``'exp_tanh'`` (DenseFlow): log_scale = 2 * tanh(raw / 2)           (scale in (e^-2, e^2))
* ``'tanh'``     (RealNVP):   log_scale = s_c * tanh(raw)             s_c a trainable per-channel
                              weight of the Keras layer ``TanhScale``, initialised to 1.

Conditional coupling: if the caller passes ``context=`` (a [B, H, W, K] tensor), the conditioner
is called on concat([x_a, context], -1) instead of x_a.

Parity as data: ``parity=`` given to a call (a scalar tensor, 0 or 1) overrides the coupling's
own, so one coupling object can run couplings of either parity in a loop
(``bijectors.repeated``). With a channel mask this needs an even C: parity 1 is then parity 0
conjugated by swapping the halves, x_a = x[..., C/2:], x_b = x[..., :C/2].
"""

import math

import keras
import numpy as np
import tensorflow as tf

from bijectors import base

MASKS = ('channel', 'checkerboard')
SCALE_FNS = ('sigmoid', 'exp_tanh', 'tanh')


class TanhScale(keras.layers.Layer):
  """Per-channel log-scale bound of the RealNVP scale: log_scale = scale * tanh(raw).

  ``scale`` [channels] is initialised to 1, so at initialisation |log_scale| < 1.
  """

  def __init__(self, channels, **kwargs):
    super().__init__(**kwargs)
    self.channels = channels
    self.scale = self.add_weight(shape=(channels,), initializer='ones', name='scale')

  def call(self, raw):
    return self.log_scale(raw)

  def log_scale(self, raw):
    """scale * tanh(raw) in raw's dtype (called directly, so Keras does not autocast raw)."""
    return tf.cast(self.scale, raw.dtype) * tf.tanh(raw)


class AffineCoupling(base.FlowBijector):
  """Affine coupling with a channel or checkerboard mask (see the module docstring)."""

  def __init__(self, conditioner, channels, mask='channel', parity=0, scale_fn='sigmoid',
               name='affine_coupling'):
    if mask not in MASKS:
      raise ValueError(f'mask must be one of {MASKS}, got {mask!r}.')
    if scale_fn not in SCALE_FNS:
      raise ValueError(f'scale_fn must be one of {SCALE_FNS}, got {scale_fn!r}.')
    if parity not in (0, 1):
      raise ValueError(f'parity must be 0 or 1, got {parity!r}.')
    if mask == 'channel' and channels < 2:
      raise ValueError(f'a channel-mask coupling needs at least 2 channels, got {channels}.')
    self.conditioner = conditioner
    self.channels = channels
    self.mask = mask
    self.parity = parity
    self.scale_fn = scale_fn
    layers = [conditioner]
    self.tanh_scale = None
    if scale_fn == 'tanh':
      self.tanh_scale = TanhScale(self._num_transformed(), name=f'{name}_tanh_scale')
      layers.append(self.tanh_scale)
    super().__init__(name=name, layers=layers)

  @staticmethod
  def conditioner_channels(channels, mask='channel'):
    """Output channels the conditioner must produce: shift and raw for each transformed one."""
    if mask == 'channel':
      return 2 * (channels // 2)
    if mask == 'checkerboard':
      return 2 * channels
    raise ValueError(f'mask must be one of {MASKS}, got {mask!r}.')

  def _num_transformed(self):
    return self.conditioner_channels(self.channels, self.mask) // 2

  # -- forward / inverse --------------------------------------------------------------------
  def _forward_and_log_det(self, x, context=None, parity=None, **unused):
    self._check_channels(x)
    if self.mask == 'channel':
      x_a, x_b = self._split(x, parity)
      shift, log_scale = self._shift_and_log_scale(x_a, context)
      y_b = x_b * tf.exp(log_scale) + shift
      return self._merge(x_a, y_b, parity), base.sum_event(log_scale)
    b = self._checkerboard(x, parity)
    shift, log_scale = self._shift_and_log_scale(x * b, context)
    y = b * x + (1. - b) * (x * tf.exp(log_scale) + shift)
    return y, base.sum_event((1. - b) * log_scale)

  def _inverse_and_log_det(self, y, context=None, parity=None, **unused):
    self._check_channels(y)
    if self.mask == 'channel':
      y_a, y_b = self._split(y, parity)
      shift, log_scale = self._shift_and_log_scale(y_a, context)
      x_b = (y_b - shift) * tf.exp(-log_scale)
      return self._merge(y_a, x_b, parity), -base.sum_event(log_scale)
    b = self._checkerboard(y, parity)
    shift, log_scale = self._shift_and_log_scale(y * b, context)
    x = b * y + (1. - b) * ((y - shift) * tf.exp(-log_scale))
    return x, -base.sum_event((1. - b) * log_scale)

  # -- per-dimension log-det (LCMA) ---------------------------------------------------------
  def forward_and_elementwise_log_det(self, x, context=None, parity=None, **unused):
    """Returns (y, e) with e [..., H, W, C] = log|dy_i/dx_i| for every dimension i.

    The Jacobian of a coupling is triangular (y_b depends on x_a, y_a = x_a), so its log|det|
    is the sum of the logs of its diagonal: e is log_scale on the transformed positions and 0
    on the conditioning ones, and sum_event(e) equals the log-det of ``forward_and_log_det``.
    Used by the LCMA analysis (``tfflows.lcma``); the training path does not call it.
    """
    self._check_channels(x)
    if self.mask == 'channel':
      x_a, x_b = self._split(x, parity)
      shift, log_scale = self._shift_and_log_scale(x_a, context)
      y_b = x_b * tf.exp(log_scale) + shift
      return (self._merge(x_a, y_b, parity),
              self._merge(tf.zeros_like(x_a), log_scale, parity))
    b = self._checkerboard(x, parity)
    shift, log_scale = self._shift_and_log_scale(x * b, context)
    y = b * x + (1. - b) * (x * tf.exp(log_scale) + shift)
    return y, (1. - b) * log_scale

  # -- pieces -------------------------------------------------------------------------------
  def _check_channels(self, x):
    if x.shape[-1] != self.channels:
      raise ValueError(f'{self.name}: expected {self.channels} channels, got shape {x.shape}.')

  def _split(self, x, parity=None):
    """Channel mask: (x_a conditioning, x_b transformed)."""
    c1 = math.ceil(self.channels / 2)
    c2 = self.channels - c1
    if parity is not None:   # a tensor: parity 1 is parity 0 on the swapped halves (C even)
      x = self._swap_if(x, parity)
      return x[..., :c1], x[..., c1:]
    if self.parity == 0:
      return x[..., :c1], x[..., c1:]
    return x[..., c2:], x[..., :c2]

  def _merge(self, x_a, x_b, parity=None):
    """Inverse of ``_split``: every channel back in its place."""
    if parity is not None:
      return self._swap_if(tf.concat([x_a, x_b], axis=-1), parity)
    return tf.concat([x_a, x_b] if self.parity == 0 else [x_b, x_a], axis=-1)

  def _swap_if(self, x, parity):
    """x with its channel halves swapped where the scalar tensor ``parity`` is 1."""
    if self.channels % 2:
      raise ValueError(f'{self.name}: a parity given as data needs an even channel count for a '
                       f'channel mask, got {self.channels}.')
    half = self.channels // 2
    swapped = tf.concat([x[..., half:], x[..., :half]], axis=-1)
    return tf.where(tf.cast(parity, tf.bool), swapped, x)

  def _checkerboard(self, x, parity=None):
    """b[h, w] = (h + w + parity) % 2 as a [H, W, 1] tensor of x's dtype (1 = condition)."""
    h, w = x.shape[-3], x.shape[-2]
    if parity is not None:   # a tensor: b = |b_0 - parity|, exactly 0 or 1
      b0 = tf.constant(((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2)[:, :, None],
                       dtype=x.dtype)
      return tf.abs(b0 - tf.cast(parity, x.dtype))
    b = (np.arange(h)[:, None] + np.arange(w)[None, :] + self.parity) % 2
    return tf.constant(b[:, :, None], dtype=x.dtype)

  def _shift_and_log_scale(self, x_a, context):
    inputs = x_a if context is None else tf.concat([x_a, tf.cast(context, x_a.dtype)], -1)
    out = tf.cast(self.conditioner(inputs), x_a.dtype)
    n = self._num_transformed()
    if out.shape[-1] != 2 * n:
      raise ValueError(
          f'{self.name}: the conditioner must output {2 * n} channels '
          f'(AffineCoupling.conditioner_channels({self.channels}, {self.mask!r})), '
          f'got shape {out.shape}.')
    shift, raw = out[..., :n], out[..., n:]
    return shift, self._log_scale(raw)

  def _log_scale(self, raw):
    if self.scale_fn == 'sigmoid':
      return tf.math.log_sigmoid(raw + 2.)
    if self.scale_fn == 'exp_tanh':
      return 2. * tf.tanh(raw / 2.)
    return self.tanh_scale.log_scale(raw)
