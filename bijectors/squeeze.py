"""2x2 squeeze (space-to-depth) with the channel order of the reference Glow code.

    forward:  y[b, i, j, 4*c + 2*dy + dx] = x[b, 2*i + dy, 2*j + dx, c]     (H, W, C) -> (H/2, W/2, 4C)
    inverse:  the same index map read the other way (unsqueeze).
    log|det dy/dx| = 0                                                     (a permutation)

This is *not* ``tf.nn.space_to_depth``, whose channel order is (dy, dx, c); the (c, dy, dx)
order keeps the four pixels of one input channel next to each other, which is what the
reference Glow code (and therefore its channel splits) assumes.
"""

import tensorflow as tf

from bijectors import base
from bijectors import batching


def squeeze(x):
  """[..., H, W, C] -> [..., H/2, W/2, 4C], output channel c*4 + 2*dy + dx (any number of
  leading axes)."""
  h, w, c = _static_event(x)
  _check_even(h, w)
  return batching.apply_batched(_squeeze_batch, x)


def unsqueeze(y):
  """[..., H, W, 4C] -> [..., 2H, 2W, C], the inverse of ``squeeze``."""
  h, w, c4 = _static_event(y)
  if c4 % 4:
    raise ValueError(f'unsqueeze needs a channel count divisible by 4, got {c4} '
                     f'(event shape {(h, w, c4)}).')
  return batching.apply_batched(_unsqueeze_batch, y)


def _squeeze_batch(x):
  """squeeze of [N, H, W, C]."""
  h, w, c = x.shape[-3:]
  t = tf.reshape(x, [-1, h // 2, 2, w // 2, 2, c])
  t = tf.transpose(t, [0, 1, 3, 5, 2, 4])            # [N, H/2, W/2, C, dy, dx]
  return tf.reshape(t, [-1, h // 2, w // 2, 4 * c])


def _unsqueeze_batch(y):
  """unsqueeze of [N, H, W, 4C]."""
  h, w, c4 = y.shape[-3:]
  c = c4 // 4
  t = tf.reshape(y, [-1, h, w, c, 2, 2])
  t = tf.transpose(t, [0, 1, 4, 2, 5, 3])            # [N, H, dy, W, dx, C]
  return tf.reshape(t, [-1, 2 * h, 2 * w, c])


class Squeeze(base.FlowBijector):
  """Bijector form of ``squeeze`` (forward) / ``unsqueeze`` (inverse); log-det 0."""

  def __init__(self, name='squeeze'):
    super().__init__(name=name, is_constant_jacobian=True)

  def _forward_and_log_det(self, x, **unused):
    return squeeze(x), tf.zeros([], x.dtype)

  def _inverse_and_log_det(self, y, **unused):
    return unsqueeze(y), tf.zeros([], y.dtype)

  def _forward_event_shape(self, s):
    s = tf.TensorShape(s)
    h, w, c = s[-3:].as_list()
    if h is not None and w is not None:
      _check_even(h, w)
    return s[:-3].concatenate([_div(h, 2), _div(w, 2), _mul(c, 4)])

  def _inverse_event_shape(self, s):
    s = tf.TensorShape(s)
    h, w, c = s[-3:].as_list()
    if c is not None and c % 4:
      raise ValueError(f'unsqueeze needs a channel count divisible by 4, got {c}.')
    return s[:-3].concatenate([_mul(h, 2), _mul(w, 2), _div(c, 4)])

  def _forward_event_shape_tensor(self, s):
    return tf.concat([s[:-3], tf.stack([s[-3] // 2, s[-2] // 2, s[-1] * 4])], 0)

  def _inverse_event_shape_tensor(self, s):
    return tf.concat([s[:-3], tf.stack([s[-3] * 2, s[-2] * 2, s[-1] // 4])], 0)


def _static_event(x):
  h, w, c = x.shape[-3:]
  if h is None or w is None or c is None:
    raise ValueError(f'squeeze needs a static event shape (H, W, C), got {x.shape}.')
  return h, w, c


def _check_even(h, w):
  if h % 2 or w % 2:
    raise ValueError(f'squeeze needs even height and width, got H={h}, W={w}; '
                     'pad or crop the image first.')


def _div(n, k):
  return None if n is None else n // k


def _mul(n, k):
  return None if n is None else n * k
