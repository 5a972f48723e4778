"""One batch axis for the networks: any leading axes of event-rank-3 tensors folded into one.

TFP calls bijectors and distributions with any number of leading (sample and batch) axes in
front of the event [H, W, C]: none (one event: during a joint distribution's shape inference,
or ``sample()``), one (a batch) or several (``sample([2, 3])`` of a batched distribution).
Convolutions need exactly one batch axis, so every tfflows bijector (``bijectors.base``) and
every conditional prior runs its networks on

    fold:    [*leading, H, W, C] -> [N, H, W, C],   N = prod(leading)   (each tensor of a structure)
    unfold:  [N, ...]            -> [*leading, ...]                    (outputs; log-dets [N] ->
                                                                         leading, so one event
                                                                         gives a scalar)

A tensor that already has exactly one batch axis passes through untouched (no op is added:
the training path costs what it did). All tensors of one call must share their leading axes;
anything else raises ValueError naming the shapes.
"""

import tensorflow as tf

EVENT_NDIMS = 3  # images: (H, W, C)


class Leading:
  """The leading axes that ``fold`` removed: none at all (one event) or several."""

  def __init__(self, static, dynamic):
    self.static = static      # tf.TensorShape of the leading axes
    self.dynamic = dynamic    # int32 tensor of the leading axes, or None for one event

  @property
  def is_single_event(self):
    return self.static.rank == 0


def fold(structure, event_ndims=EVENT_NDIMS, what='input'):
  """Folds the leading axes of every tensor of ``structure`` into one.

  Returns (folded structure, leading): leading is None when every tensor already has exactly
  one leading axis (then the structure comes back as is), else a ``Leading`` for ``unfold``.
  Raises ValueError if a tensor has fewer than ``event_ndims`` axes, an unknown rank, or
  different leading axes than the others.
  """
  tensors = [tf.convert_to_tensor(t) for t in tf.nest.flatten(structure)]
  if not tensors:
    return structure, None
  ranks = []
  for t in tensors:
    if t.shape.rank is None:
      raise ValueError(f'{what}: the rank of every tensor must be known (an event of rank '
                       f'{event_ndims} with leading axes), got a tensor of unknown rank.')
    if t.shape.rank < event_ndims:
      raise ValueError(f'{what}: expected events of rank {event_ndims} [..., H, W, C] with any '
                       f'number of leading axes, got shape {t.shape}.')
    ranks.append(t.shape.rank)
  if len(set(ranks)) > 1:
    raise ValueError(f'{what}: every tensor must have the same leading axes, got shapes '
                     f'{[t.shape for t in tensors]}.')
  num_leading = ranks[0] - event_ndims
  if num_leading == 1:
    return tf.nest.pack_sequence_as(structure, tensors), None
  first = tensors[0]
  if num_leading == 0:
    leading = Leading(tf.TensorShape([]), None)
    folded = [t[None] for t in tensors]
  else:
    leading = Leading(first.shape[:num_leading], tf.shape(first)[:num_leading])
    folded = [tf.reshape(t, _folded_shape(t, event_ndims)) for t in tensors]
  return tf.nest.pack_sequence_as(structure, folded), leading


def fold_like(structure, leading, event_ndims=EVENT_NDIMS, what='condition'):
  """Folds ``structure`` (e.g. a coupling's context) that shares the leading axes of the input
  that ``fold`` returned ``leading`` for."""
  if structure is None or not tf.nest.flatten(structure):
    return structure
  folded, own = fold(structure, event_ndims, what)
  if leading is None and own is None:
    return folded
  if (leading is None) != (own is None) or leading.static.rank != own.static.rank:
    raise ValueError(f'{what}: its leading axes must be those of the input, got shapes '
                     f'{[t.shape for t in tf.nest.flatten(structure)]}.')
  return folded


def unfold(structure, leading):
  """Restores the leading axes on every tensor of ``structure`` (outputs with one batch axis)."""
  if leading is None:
    return structure
  return tf.nest.map_structure(lambda t: _unfold_tensor(t, leading), structure)


def unfold_log_det(log_det, leading, dtype):
  """A log-det [N] (or a scalar: the same for every event) back to the leading axes."""
  log_det = tf.convert_to_tensor(log_det, dtype)
  if leading is None or log_det.shape.rank == 0:
    return log_det
  return _unfold_tensor(log_det, leading)


def apply_batched(fn, x, event_ndims=EVENT_NDIMS):
  """Applies ``fn`` (expecting [N, *event]) to x with any number of leading axes; ``fn``'s
  outputs (a structure of tensors with a leading axis N) get the leading axes back."""
  folded, leading = fold(x, event_ndims)
  return unfold(fn(folded), leading)


def _folded_shape(t, event_ndims):
  event = t.shape[-event_ndims:]
  if event.is_fully_defined():
    return [-1] + event.as_list()
  return tf.concat([[-1], tf.shape(t)[-event_ndims:]], 0)


def _unfold_tensor(t, leading):
  if leading.is_single_event:
    return t[0]
  rest = t.shape[1:]
  rest_dynamic = rest.as_list() if rest.is_fully_defined() else tf.shape(t)[1:]
  out = tf.reshape(t, tf.concat([leading.dynamic, rest_dynamic], 0))
  out.set_shape(leading.static.concatenate(rest))
  return out
