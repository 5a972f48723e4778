"""What a checkpoint holds: the model's variables as one list, checked before they are read.

A training checkpoint is a ``tf.train.Checkpoint(model_variables, optimizer, step, epoch)``:
``model_variables`` is ``model.variables`` as a list, in the model's fixed construction order:
every Keras weight (ActNorm's ``initialized`` flags included, so a restored model does not
initialise again) and the state of every Keras SeedGenerator. The optimizer brings its
iteration count and moments; step and epoch are the counters of the run.

Why a list and not ``model=model``: tf.train.Checkpoint follows the attributes of a Keras 3
model only partly. It does not see SeedGenerator states, nor layers held in plain Python lists
(FlowModel.priors), so a model restored through ``model=`` silently keeps the initial values of
its priors (a full restore hid this by finding those weights through the optimizer's list of
trainable variables). A list of ``model.variables`` is complete by construction.

Rules: before anything is read, the checkpoint's object graph (a proto in the checkpoint) must
hold exactly the model's variables, count and shapes, else ``CheckpointError`` names the first
difference (and the converter, for a checkpoint of unrolled flow steps); files that cannot be
read give ``CheckpointError`` naming the checkpoint and its files.
"""

import os

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from bijectors import repeated
from train.checkpoint_files import CheckpointError, checkpoint_files, one_line

MODEL_VARIABLES = 'model_variables'

# What TensorFlow raises reading damaged checkpoint files: OpErrors (DataLossError "not an
# sstable"), and from the checkpoint reader's bindings IndexError ("Read less bytes than
# requested") or ValueError.
READ_ERRORS = (tf.errors.OpError, ValueError, IndexError, RuntimeError)


def model_checkpoint(model):
  """A checkpoint of the model alone (restores from a full training checkpoint)."""
  return tf.train.Checkpoint(**{MODEL_VARIABLES: list(model.variables)})


def _reader(prefix):
  try:
    return tf.train.load_checkpoint(prefix)
  except READ_ERRORS as error:
    raise CheckpointError(unreadable(prefix, error)) from None


def unreadable(prefix, error):
  """The message of a CheckpointError for checkpoint files that cannot be read."""
  return (f'checkpoint {prefix} cannot be read ({one_line(error)}): its files '
          f'({", ".join(os.path.basename(p) for p in checkpoint_files(prefix)) or "none"}) are '
          'truncated or damaged.')


def check_model_variables(prefix, model):
  """Raises CheckpointError (a ValueError) unless checkpoint ``prefix`` holds exactly the
  model's variables: as many, each of the same shape (a checkpoint of another architecture
  would otherwise restore partly, or fail deep inside TensorFlow). The message names the
  first variable that differs."""
  shapes = stored_shapes(prefix)
  variables = model.variables
  if len(shapes) != len(variables):
    layout = _unrolled_layout_message(prefix, model, len(shapes))
    if layout:
      raise CheckpointError(layout)
    raise CheckpointError(
        f'checkpoint {prefix} holds {len(shapes)} model variables, the model built from the '
        f'flags has {len(variables)}: a different architecture (were the model flags different '
        'when it was written?).')
  for i, (v, stored_shape) in enumerate(zip(variables, shapes)):
    if stored_shape is not None and list(stored_shape) != list(v.shape):
      raise CheckpointError(
          f'checkpoint {prefix} holds model variable {i} ({v.path}) with shape {stored_shape}, '
          f'the model built from the flags has shape {list(v.shape)}: a different architecture '
          '(were the model flags different when it was written?).')


def stored_shapes(prefix):
  """The shape of each model variable checkpoint ``prefix`` holds, in order (None where the
  checkpoint has the object but no value); CheckpointError if its files cannot be read."""
  reader = _reader(prefix)
  try:
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
  except READ_ERRORS as error:
    raise CheckpointError(unreadable(prefix, error)) from None
  root = graph.nodes[0]
  node = next((graph.nodes[c.node_id] for c in root.children if c.local_name == MODEL_VARIABLES),
              None)
  stored = len(node.children) if node is not None else 0
  shapes = reader.get_variable_to_shape_map()
  return [shapes.get(f'{MODEL_VARIABLES}/{i}/.ATTRIBUTES/VARIABLE_VALUE') for i in range(stored)]


def _unrolled_layout_message(prefix, model, stored):
  """A sentence explaining the refusal when checkpoint ``prefix`` (``stored`` model variables)
  holds this loop-layout model in the unrolled layout (``bijectors.repeated``: one set of
  variables per step); '' when it does not."""
  layout = unrolled_variable_layout(model)
  if (stored == len(model.variables) or stored != len(layout)
      or all(k is None for _, k in layout)):
    return ''
  return (f'checkpoint {prefix} holds this model with unrolled flow steps ({stored} variables, '
          'one set per step, as written before repeated steps ran as loops), but the model built '
          'from the flags keeps each group of repeated steps as stacked weights '
          f'({len(model.variables)} variables). Convert it with '
          '`python -m train.convert_checkpoint --flagfile=... --source=CHECKPOINT '
          '--workdir=NEW_WORKDIR` (the same numbers, in the stacked layout).')


def restore_model(model, prefix):
  """Loads the model weights (and SeedGenerator states) of checkpoint ``prefix``.

  Raises CheckpointError (a ValueError) naming the checkpoint when its files cannot be read or
  it holds another architecture."""
  check_model_variables(prefix, model)
  try:
    status = model_checkpoint(model).read(prefix)
  except READ_ERRORS as error:
    raise CheckpointError(unreadable(prefix, error)) from None
  status.expect_partial()
  try:
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as error:
    raise CheckpointError(f'checkpoint {prefix} does not hold this model (were the model flags '
                          f'different when it was written?): {str(error)[:500]}') from None
  return prefix


def unrolled_variable_layout(model):
  """Maps the variables of a model (its repeated steps stacked, ``bijectors.repeated``) onto
  the layout of the same model with unrolled steps, each step its own variables: the layout of
  the checkpoints written before repeated steps ran as loops.

  model: a Keras model or layer. Returns one entry per variable of the unrolled model, in the
  order of its ``variables``: (variable, None) for a variable both layouts share, (stacked
  weight, k) for the k-th slice of a stacked weight. (Each layer's variables are contiguous in
  ``model.variables``, and a stacked weight's slice k belongs to step k, whose layers hold the
  template's variables in the template's order.)
  """
  owner = {}
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, repeated.StackedWeights):
      for w in layer.variables:
        owner[id(w)] = layer
  layout, done = [], set()
  for v in model.variables:
    layer = owner.get(id(v))
    if layer is None:
      layout.append((v, None))
    elif id(layer) not in done:
      done.add(id(layer))
      layout.extend((w, k) for k in range(layer.num_steps) for w in layer.ordered)
  return layout
