"""Helpers for conditioners that TFP calls with unbatched or multiply-batched tensors.

TFP joint distributions call conditional factors with event-rank tensors that have no batch
axis (during shape inference) or several leading axes (sample shapes). Convolutions need
exactly one batch axis, so a conditioner folds the leading axes into one and unfolds after.
"""

import tensorflow as tf


def apply_batched(fn, x, event_ndims=3):
  """Applies ``fn`` (expecting [B, *event]) to x with any number of leading axes."""
  x = tf.convert_to_tensor(x)
  leading = tf.shape(x)[:-event_ndims]
  event = x.shape[-event_ndims:]
  flat = tf.reshape(x, [-1] + list(event))
  out = fn(flat)
  return tf.nest.map_structure(
      lambda t: tf.reshape(t, tf.concat([leading, tf.shape(t)[1:]], axis=0)), out)
