"""Two layouts of a model's variables: repeated steps as loops over stacked weights, or unrolled.

A model built with ``step_loop=True`` (the default) holds the K steps of every
``bijectors.repeated.Repeated`` as weights [K, ...]; built with ``step_loop=False`` (and every
checkpoint written before loops existed) it holds K separate steps. Both have the same numbers:
``unrolled_layout(model)`` lists, for a loop-layout model, where each variable of the unrolled
layout lives (a whole variable, or slice k of a stacked weight), in the unrolled model's
``variables`` order, which is the order of its checkpoints' ``model_variables``.

    values = [v.numpy() for v in unrolled_model.variables]
    assign_unrolled_values(loop_model, values)          # now the same model, stacked

``python -m train.convert_checkpoint`` converts a training checkpoint (weights and optimizer
slots) this way.
"""

import numpy as np

from bijectors import repeated


def unrolled_layout(model):
  """[(variable, k or None)] of ``model`` (loop layout) in the unrolled layout's order; see
  ``bijectors.repeated.unrolled_variable_layout``."""
  return repeated.unrolled_variable_layout(model)


def has_loops(model):
  """Whether any variable of the model is a stacked step weight."""
  return any(k is not None for _, k in unrolled_layout(model))


def unrolled_shapes(model):
  """Shapes of the unrolled layout's variables, in its order."""
  return [tuple(v.shape[1:]) if k is not None else tuple(v.shape)
          for v, k in unrolled_layout(model)]


def assign_unrolled_values(model, values, layout=None):
  """Assigns values listed in the unrolled layout's order (one array per variable) to the
  variables of ``model`` (loop layout). Raises ValueError naming the first mismatch."""
  layout = unrolled_layout(model) if layout is None else layout
  values = list(values)
  if len(values) != len(layout):
    raise ValueError(f'{len(values)} values for an unrolled layout of {len(layout)} variables.')
  stacked = {}
  for i, ((v, k), value) in enumerate(zip(layout, values)):
    value = np.asarray(value)
    expected = tuple(v.shape[1:]) if k is not None else tuple(v.shape)
    if value.shape != expected:
      raise ValueError(f'unrolled variable {i} ({v.path}{"" if k is None else f"[{k}]"}) has '
                       f'shape {expected}, the value given {value.shape}.')
    if k is None:
      v.assign(value)
    else:
      stacked.setdefault(id(v), (v, np.array(v.numpy())))[1][k] = value
  for v, array in stacked.values():
    v.assign(array)


def unrolled_values(model, layout=None):
  """The values of ``model``'s variables (loop layout) in the unrolled layout's order."""
  layout = unrolled_layout(model) if layout is None else layout
  cache = {}
  result = []
  for v, k in layout:
    if id(v) not in cache:
      cache[id(v)] = np.asarray(v.numpy())
    result.append(cache[id(v)] if k is None else cache[id(v)][k])
  return result
