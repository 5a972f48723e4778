r"""Converts a training checkpoint of unrolled flow steps into the stacked (loop) layout.

    python -m train.convert_checkpoint --flagfile=configs/cifar10.flags \
        --source=/data/runs/df_cifar10 --workdir=/data/runs/df_cifar10_loop

Checkpoints written before repeated flow steps ran as loops hold one set of variables per step;
the model built from the flags holds each group of repeated steps as stacked weights [K, ...]
and refuses them. This program builds the model of the flags, reads the source checkpoint
(``--source``: a checkpoint prefix, a checkpoint directory or a workdir, whose latest
checkpoint is used) in the unrolled layout -- its model variables by index, its optimizer
through stand-in variables of the unrolled shapes -- writes every weight, every optimizer slot,
the optimizer's iteration count and the step and epoch counters into the model's stacked
layout, and writes ``--workdir``/checkpoints/ckpt-<step> and ``config.json``, so that
``python -m train.main`` with the same flags and ``--workdir`` resumes the run there. The model
flags must be those the source was trained with. The numbers are unchanged: the loop runs the
same steps on the same weights.

The two layouts: ``train.checkpoint_contents.unrolled_variable_layout`` lists, for a model,
where each variable of the unrolled layout lives (a whole variable, or slice k of a stacked
weight), in the order of the unrolled checkpoints' ``model_variables``;
``assign_unrolled_values`` and ``copy_unrolled_optimizer`` copy values and optimizer slots
along it.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position
from absl import app  # noqa: E402  pylint: disable=wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

import tfflows  # noqa: E402  pylint: disable=wrong-import-position
from tfflows import atomic  # noqa: E402  pylint: disable=wrong-import-position
from train import checkpoint_contents  # noqa: E402  pylint: disable=wrong-import-position
from train import checkpoint_files  # noqa: E402  pylint: disable=wrong-import-position
from train import checkpoints  # noqa: E402  pylint: disable=wrong-import-position
from train import flags as train_flags  # noqa: E402,F401  pylint: disable=wrong-import-position
from train import trainer  # noqa: E402  pylint: disable=wrong-import-position
from train.benchmark import build_config  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('source', None, 'Checkpoint prefix, checkpoint directory or workdir of the '
                    'unrolled-layout checkpoint to convert.')


def convert(config, source, workdir, optimizer='adamax', learning_rate=1e-3):
  """Converts checkpoint ``source`` (unrolled layout of ``config``'s model) into ``workdir``;
  returns the new checkpoint prefix."""
  prefix = checkpoint_files.find_checkpoint(source)
  if prefix is None:
    raise ValueError(f'--source={source}: no checkpoint there.')
  config = config.replace(remat='none')
  looped = tfflows.build_model(config)
  layout = checkpoint_contents.unrolled_variable_layout(looped)
  values = read_unrolled_values(prefix, layout)
  # The source optimizer, built on stand-ins of the unrolled trainable variables and restored
  # through the checkpoint's object graph (its slots are matched by position).
  stand_ins = [keras.Variable(np.zeros(shape, v.dtype), dtype=v.dtype, name=f'unrolled_{i}')
               for i, (v, shape) in enumerate(_unrolled_shapes(layout)) if v.trainable]
  source_optimizer = trainer.make_optimizer(optimizer, learning_rate)
  source_optimizer.build(stand_ins)
  tf.train.Checkpoint(optimizer=source_optimizer).read(prefix).expect_partial()
  # The progress counters the Checkpointer saves by name, read as values.
  reader = tf.train.load_checkpoint(prefix)
  step, epoch = (int(reader.get_tensor(f'{name}/.ATTRIBUTES/VARIABLE_VALUE'))
                 for name in ('step', 'epoch'))
  assign_unrolled_values(looped, values)
  target_optimizer = trainer.make_optimizer(optimizer, learning_rate)
  target_optimizer.build(looped.trainable_variables)
  copy_unrolled_optimizer(source_optimizer, target_optimizer, looped)
  writer = checkpoints.Checkpointer(workdir, looped, target_optimizer, keep=1)
  written = writer.save(step, epoch)
  atomic.write_json(os.path.join(workdir, checkpoints.CONFIG_JSON), config.to_dict())
  return written


def _unrolled_shapes(layout):
  """[(variable, shape of its unrolled counterpart)] along a layout."""
  return [(v, tuple(v.shape[1:]) if k is not None else tuple(v.shape)) for v, k in layout]


def read_unrolled_values(prefix, layout):
  """The model variables of checkpoint ``prefix``, read by index: one array per entry of the
  unrolled layout. Raises ValueError unless the checkpoint holds exactly that layout."""
  stored = checkpoint_contents.stored_shapes(prefix)
  expected = [shape for _, shape in _unrolled_shapes(layout)]
  if len(stored) != len(expected):
    raise ValueError(f'checkpoint {prefix} holds {len(stored)} model variables, the unrolled '
                     f'layout of the model of the flags {len(expected)}: not this model in the '
                     'unrolled layout (were the model flags different when it was written?).')
  for i, (shape, want) in enumerate(zip(stored, expected)):
    if shape is None or tuple(shape) != want:
      raise ValueError(f'checkpoint {prefix}: model variable {i} has shape {shape}, the '
                       f'unrolled layout of the model of the flags {list(want)}.')
  reader = tf.train.load_checkpoint(prefix)
  return [reader.get_tensor(f'{checkpoint_contents.MODEL_VARIABLES}/{i}/.ATTRIBUTES/'
                            'VARIABLE_VALUE') for i in range(len(expected))]


def assign_unrolled_values(model, values):
  """Assigns values listed in the unrolled layout's order (one array per variable) to the
  variables of ``model`` (loop layout). Raises ValueError naming the first mismatch."""
  layout = checkpoint_contents.unrolled_variable_layout(model)
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
  trainable = [(v, k) for v, k in checkpoint_contents.unrolled_variable_layout(model)
               if v.trainable]
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments (not flags): {" ".join(argv[1:])}')
  if not FLAGS.source or not FLAGS.workdir:
    raise app.UsageError('--source (the unrolled checkpoint) and --workdir (where the converted '
                         'checkpoint goes) are required.')
  if checkpoint_files.find_checkpoint(FLAGS.workdir) is not None:
    raise app.UsageError(f'--workdir={FLAGS.workdir} already has a checkpoint; give a new one.')
  written = convert(build_config(FLAGS), FLAGS.source, FLAGS.workdir, FLAGS.optimizer,
                    FLAGS.learning_rate)
  print(f'converted {checkpoint_files.find_checkpoint(FLAGS.source)} -> {written}')


if __name__ == '__main__':
  app.run(main)
