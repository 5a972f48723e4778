"""Fixed permutations of an image event; every one has log|det| = 0.

* ``ReverseChannels``:  y[..., i] = x[..., C - 1 - i]
* ``SwapHalves``:       y = concat(x[..., c1:], x[..., :c1]),  c1 = ceil(C/2)
                        x = concat(y[..., C - c1:], y[..., :C - c1])   (exact for odd C)
* ``ChannelPermutation(perm)``:  y[..., i] = x[..., perm[i]];  x[..., perm[i]] = y[..., i]
* ``FlatPermutation(perm, event_shape, out_shape)``:  flatten the event in C (row-major) order,
                        y_flat[i] = x_flat[perm[i]], reshape to ``out_shape``.
"""

import math

import numpy as np
import tensorflow as tf

from bijectors import base


def _zero(x):
  return tf.zeros([], x.dtype)


def validate_permutation(perm, size=None, what='perm'):
  """Returns perm as an int numpy array, or raises ValueError saying what is wrong."""
  p = np.asarray(perm)
  if p.ndim != 1:
    raise ValueError(f'{what} must be a 1-D list of indices, got shape {p.shape}.')
  if p.size and not np.issubdtype(p.dtype, np.integer):
    raise ValueError(f'{what} must hold integers, got dtype {p.dtype}.')
  if size is not None and p.size != size:
    raise ValueError(f'{what} has {p.size} entries but must have {size}.')
  missing = sorted(set(range(p.size)) - set(p.tolist()))
  if missing:
    counts = np.bincount(p[(p >= 0) & (p < p.size)], minlength=p.size)
    problems = []
    out_of_range = p[(p < 0) | (p >= p.size)].tolist()
    if out_of_range:
      problems.append(f'out-of-range indices {out_of_range[:5]}')
    duplicates = np.nonzero(counts > 1)[0].tolist()
    if duplicates:
      problems.append(f'duplicated indices {duplicates[:5]}')
    problems.append(f'missing indices {missing[:5]}')
    raise ValueError(f'{what} is not a permutation of 0..{p.size - 1}: ' + ', '.join(problems)
                     + '.')
  return p.astype(np.int32)


class ReverseChannels(base.FlowBijector):
  """y[..., i] = x[..., C - 1 - i]; its own inverse."""

  def __init__(self, name='reverse_channels'):
    super().__init__(name=name, is_constant_jacobian=True)

  def _forward_and_log_det(self, x, **unused):
    return tf.reverse(x, axis=[-1]), _zero(x)

  def _inverse_and_log_det(self, y, **unused):
    return tf.reverse(y, axis=[-1]), _zero(y)


class SwapHalves(base.FlowBijector):
  """y = concat(x[..., c1:], x[..., :c1]) with c1 = ceil(C/2) (DenseFlow's step end)."""

  def __init__(self, name='swap_halves'):
    super().__init__(name=name, is_constant_jacobian=True)

  def _forward_and_log_det(self, x, **unused):
    c1 = math.ceil(x.shape[-1] / 2)
    return tf.concat([x[..., c1:], x[..., :c1]], axis=-1), _zero(x)

  def _inverse_and_log_det(self, y, **unused):
    c2 = y.shape[-1] - math.ceil(y.shape[-1] / 2)   # channels that went to the front
    return tf.concat([y[..., c2:], y[..., :c2]], axis=-1), _zero(y)


class ChannelPermutation(base.FlowBijector):
  """y[..., i] = x[..., perm[i]] for a fixed permutation ``perm`` of the C channels."""

  def __init__(self, perm, name='channel_permutation'):
    self.perm = validate_permutation(perm)
    self.inverse_perm = np.argsort(self.perm).astype(np.int32)
    super().__init__(name=name, is_constant_jacobian=True)

  def _forward_and_log_det(self, x, **unused):
    self._check(x)
    return tf.gather(x, self.perm, axis=-1), _zero(x)

  def _inverse_and_log_det(self, y, **unused):
    self._check(y)
    return tf.gather(y, self.inverse_perm, axis=-1), _zero(y)

  def _check(self, x):
    if x.shape[-1] != self.perm.size:
      raise ValueError(f'{self.name}: a permutation of {self.perm.size} channels applied to '
                       f'shape {x.shape}.')


class FlatPermutation(base.FlowBijector):
  """A fixed permutation of all H*W*C event dimensions, possibly reshaped.

      y_flat[i] = x_flat[perm[i]]   (flattening in C order), y = reshape(y_flat, out_shape)
  """

  def __init__(self, perm, event_shape, out_shape=None, name='flat_permutation'):
    self.event_shape_in = _event_shape(event_shape, 'event_shape')
    self.event_shape_out = _event_shape(
        self.event_shape_in if out_shape is None else out_shape, 'out_shape')
    size = int(np.prod(self.event_shape_in))
    if int(np.prod(self.event_shape_out)) != size:
      raise ValueError(f'out_shape {self.event_shape_out} has a different size than '
                       f'event_shape {self.event_shape_in}.')
    self.perm = validate_permutation(perm, size)
    self.inverse_perm = np.argsort(self.perm).astype(np.int32)
    super().__init__(name=name, is_constant_jacobian=True)

  def _forward_and_log_det(self, x, **unused):
    return _permute_flat(x, self.perm, self.event_shape_in, self.event_shape_out), _zero(x)

  def _inverse_and_log_det(self, y, **unused):
    return (_permute_flat(y, self.inverse_perm, self.event_shape_out, self.event_shape_in),
            _zero(y))

  def _forward_event_shape(self, s):
    return tf.TensorShape(s)[:-3].concatenate(self.event_shape_out)

  def _inverse_event_shape(self, s):
    return tf.TensorShape(s)[:-3].concatenate(self.event_shape_in)

  def _forward_event_shape_tensor(self, s):
    return tf.concat([s[:-3], tf.constant(self.event_shape_out, s.dtype)], 0)

  def _inverse_event_shape_tensor(self, s):
    return tf.concat([s[:-3], tf.constant(self.event_shape_in, s.dtype)], 0)


def _event_shape(shape, what):
  shape = [int(d) for d in shape]
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f'{what} must be 3 positive ints (H, W, C), got {shape}.')
  return shape


def _permute_flat(x, perm, shape_in, shape_out):
  """[N, *shape_in] -> [N, *shape_out] (the base class folds any leading axes into N)."""
  if list(x.shape[-3:]) != list(shape_in):
    raise ValueError(f'expected event shape {tuple(shape_in)}, got tensor shape {x.shape}.')
  flat = tf.reshape(x, [-1, perm.size])
  return tf.reshape(tf.gather(flat, perm, axis=-1), [-1] + list(shape_out))
