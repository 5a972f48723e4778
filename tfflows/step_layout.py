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

import keras
import numpy as np
import tensorflow as tf

from bijectors import repeated


def unrolled_layout(model):
  """[(variable, k or None)] of ``model`` (loop layout) in the unrolled layout's order; see
  ``bijectors.repeated.unrolled_variable_layout``."""
  return repeated.unrolled_variable_layout(model)


def has_loops(model):
  """Whether any variable of the model is a stacked step weight."""
  return any(k is not None for _, k in unrolled_layout(model))


def has_while_loops(model):
  """Whether any group of stacked steps runs as a ``tf.while_loop`` (K >= the minimum loop
  length; shorter groups are traced step by step)."""
  return any(isinstance(layer, repeated.StackedWeights)
             and layer.num_steps >= repeated.MIN_LOOP_STEPS
             for layer in model._flatten_layers(include_self=False))  # pylint: disable=protected-access


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


# -- checkpoints ----------------------------------------------------------------------------------
MODEL_VARIABLES = 'model_variables'   # the list train/checkpoints.py saves model.variables under


def checkpoint_values(prefix, count=None, root=MODEL_VARIABLES):
  """The values of ``root``'s list in checkpoint ``prefix``, in list order (``count`` of them,
  default all)."""
  reader = tf.train.load_checkpoint(prefix)
  names = reader.get_variable_to_shape_map()
  if count is None:
    count = sum(1 for n in names if n.startswith(f'{root}/') and n.endswith('VARIABLE_VALUE'))
  return [reader.get_tensor(f'{root}/{i}/.ATTRIBUTES/VARIABLE_VALUE') for i in range(count)]


def unrolled_checkpoint_message(prefix, model, stored):
  """A sentence explaining the refusal when checkpoint ``prefix`` (``stored`` model variables)
  holds this loop-layout model in the unrolled layout; '' when it does not."""
  layout = unrolled_layout(model)
  if stored == len(model.variables) or stored != len(layout) or not has_loops(model):
    return ''
  return (f'checkpoint {prefix} holds this model with unrolled flow steps ({stored} variables, '
          'one set per step, as written before repeated steps ran as loops, or with '
          f'--nostep_loop), but the model built from the flags keeps each group of repeated '
          f'steps as stacked weights ({len(model.variables)} variables). Convert it with '
          '`python -m train.convert_checkpoint --flagfile=... --source=CHECKPOINT '
          '--workdir=NEW_WORKDIR` (the same numbers, in the stacked layout), or build the model '
          'with --nostep_loop.')


def load_unrolled_checkpoint(model, prefix):
  """Loads the model variables of an unrolled-layout checkpoint into ``model`` (loop layout).
  Raises ValueError when the checkpoint does not hold this model in that layout."""
  layout = unrolled_layout(model)
  values = checkpoint_values(prefix, len(layout))
  assign_unrolled_values(model, values, layout)


def optimizer_slot_lists(optimizer):
  """The optimizer's per-variable slot lists (e.g. Adamax's m and u), each aligned with the
  variables it was built on."""
  variables = list(optimizer._trainable_variables)  # pylint: disable=protected-access
  slots = []
  for name, value in sorted(vars(optimizer).items()):
    if (name != '_trainable_variables' and isinstance(value, (list, tuple))
        and len(value) == len(variables) and value
        and all(isinstance(v, keras.Variable) and tuple(v.shape) == tuple(w.shape)
                for v, w in zip(value, variables))):
      slots.append(list(value))
  return variables, slots


def copy_unrolled_optimizer(source, target, model):
  """Copies an optimizer built on an unrolled model's trainable variables (``source``) into
  one built on ``model``'s (loop layout; ``target``): iterations and every slot, stacked."""
  target.iterations.assign(source.iterations)
  src_vars, src_slots = optimizer_slot_lists(source)
  dst_vars, dst_slots = optimizer_slot_lists(target)
  if len(src_slots) != len(dst_slots):
    raise ValueError(f'optimizers differ: {len(src_slots)} vs {len(dst_slots)} slot lists.')
  position = {id(v): i for i, v in enumerate(dst_vars)}
  trainable = [(v, k) for v, k in unrolled_layout(model) if v.trainable]
  if len(trainable) != len(src_vars):
    raise ValueError(f'{len(src_vars)} optimised variables for {len(trainable)} trainable '
                     'variables of the unrolled layout.')
  for src, dst in zip(src_slots, dst_slots):
    values = {}
    for (v, k), slot in zip(trainable, src):
      i = position[id(v)]
      if k is None:
        dst[i].assign(slot)
      else:
        values.setdefault(i, np.array(dst[i].numpy()))[k] = slot.numpy()
    for i, array in values.items():
      dst[i].assign(array)
