r"""Throughput and memory of a model built from a flagfile: training, evaluation, sampling.

    python -m train.benchmark --flagfile=configs/denseflow_small.flags [--batch_size=B]
        [--steps=N] [--parts=train,eval,sample] [--nojit_compile]

The model comes from the same flags as ``train.main`` (``train/flags.py``); the images are
random uint8 batches of the dataset's shape (no data is read), so only the computation is
measured. For each part, after ``--warmup`` untimed calls (the first one traces and compiles):

    train    images/s of the compiled training step: ``FlowModel.train_step`` (forward, backward,
             Adamax update) as one ``tf.function`` with ``jit_compile`` from ``--jit_compile``,
             i.e. what ``model.fit`` runs each step.
    eval     images/s of the one-sample log-likelihood (``FlowModel.estimate_log_prob`` with
             k = 1: dequantization, augmentation noise, flow, prior) as one ``tf.function``
             with the same ``jit_compile``.
    sample   images/s of drawing uint8 images at temperature 1 (top-down prior sampling and the
             inverse flow) as one ``tf.function`` with the same ``jit_compile``.

Each timed part runs ``--steps`` calls and reads the result back to the host once at the end.
Two memory figures per part:

    peak RSS     the process's resident-set high-water mark (``resource.getrusage``) read after
                 the part: everything the process holds, so each row shows the peak so far. It
                 includes TensorFlow itself (the RSS right after ``import tensorflow`` is printed
                 as the baseline), the traced Python graph and the instantiated kernels.
    tensor peak  the peak of the bytes TensorFlow's allocator held for tensors during the part
                 (``tf.config.experimental.get_memory_info``, reset before each part) on the
                 device the part ran on: weights, optimizer slots, activations, gradients; the
                 counterpart of ``torch.cuda.max_memory_allocated``. Printed as "unavailable"
                 (None in the rows) where the allocator keeps no statistics: TensorFlow's
                 plain CPU allocator (oneDNN off: TF_ENABLE_ONEDNN_OPTS=0, or its default on
                 CPUs without AVX512-VNNI/BF16, AVX-VNNI or AMX) keeps none. With oneDNN on,
                 the CPU allocator counts only allocations of 256 KiB or more (smaller ones
                 read 0), so on CPU the figure is a lower bound and 0 for tiny models.

The load average of the machine is printed before and after: the figures are only comparable on
a quiet machine.
"""

import os
import resource
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

RSS_AFTER_IMPORT_GB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
from absl import app  # noqa: E402  pylint: disable=wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

import tfflows  # noqa: E402  pylint: disable=wrong-import-position
from tfflows.data import pipeline  # noqa: E402  pylint: disable=wrong-import-position
from tfflows.models.flow_model import to_images  # noqa: E402  pylint: disable=wrong-import-position
from train import flags as train_flags  # noqa: E402  pylint: disable=wrong-import-position
from train import trainer  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
PARTS = ('train', 'eval', 'sample')

flags.DEFINE_integer('steps', 5, 'Timed calls of each part.', lower_bound=1)
flags.DEFINE_integer('warmup', 2, 'Untimed calls of each part before timing (the first one '
                     'traces and compiles).', lower_bound=1)
flags.DEFINE_list('parts', list(PARTS), 'Parts to measure: train, eval, sample.')


def peak_memory_gb():
  """Resident-set high-water mark of this process in GB (ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _device():
  return 'GPU:0' if tf.config.list_logical_devices('GPU') else 'CPU:0'


def reset_tensor_peak():
  """Starts a new tensor-memory peak on the device the parts run on."""
  try:
    tf.config.experimental.reset_memory_stats(_device())
  except ValueError:   # allocator statistics are off (e.g. TF_ENABLE_ONEDNN_OPTS=0 on CPU)
    pass


def tensor_peak_gb():
  """Peak bytes the device's allocator held for tensors since the last reset, in GB, or None
  when the allocator keeps no statistics (the figure is unavailable, not zero)."""
  try:
    return tf.config.experimental.get_memory_info(_device())['peak'] / 1e9
  except ValueError:
    return None


def build_config(flag_values):
  """The FlowConfig of the model flags; image_shape defaults to the dataset's."""
  values = train_flags.model_field_values(flag_values)
  if not values['image_shape']:
    values['image_shape'] = tuple(pipeline.dataset_info(flag_values.dataset)[0])
  return tfflows.FlowConfig(**values)


def _timed(fn, args, warmup, steps):
  """Seconds per call of fn(*args) after warm-up; one host read-back at the end."""
  reset_tensor_peak()
  out = None
  for _ in range(warmup):
    out = fn(*args)
  tf.nest.map_structure(lambda t: t.numpy(), out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  tf.nest.map_structure(lambda t: t.numpy(), out)
  return (time.perf_counter() - start) / steps


def run_benchmark(config, batch_size, parts, steps, warmup, jit_compile, optimizer='adamax',
                  learning_rate=1e-3, seed=0):
  """Returns (rows, info): rows of (part, images/s, seconds per call, peak RSS GB so far,
  tensor peak GB of the part or None where unavailable)."""
  keras.utils.set_random_seed(seed)
  start = time.perf_counter()
  model = tfflows.build_model(config)
  info = {'build_s': time.perf_counter() - start,
          'parameters': int(sum(np.prod(v.shape) for v in model.trainable_variables)),
          'peak_after_build_gb': peak_memory_gb()}
  rng = np.random.RandomState(seed)
  images = tf.constant(rng.randint(0, 256, (batch_size,) + tuple(config.image_shape)),
                       tf.float32)
  rows = []
  if 'train' in parts:
    model.compile(trainer.make_optimizer(optimizer, learning_rate), jit_compile=jit_compile)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step, jit_compile=jit_compile)
    seconds = _timed(step, (images,), warmup, steps)
    rows.append(('train', batch_size / seconds, seconds, peak_memory_gb(), tensor_peak_gb()))
  if 'eval' in parts:
    evaluate = tf.function(lambda x: model.estimate_log_prob(x, 1), jit_compile=jit_compile,
                           autograph=False)
    seconds = _timed(evaluate, (images,), warmup, steps)
    rows.append(('eval', batch_size / seconds, seconds, peak_memory_gb(), tensor_peak_gb()))
  if 'sample' in parts:
    sample = tf.function(lambda seed: to_images(model.sample_values(batch_size, 1.0, seed)),
                         jit_compile=jit_compile, autograph=False)
    seconds = _timed(sample, (tf.constant([seed, 1], tf.int32),), warmup, steps)
    rows.append(('sample', batch_size / seconds, seconds, peak_memory_gb(), tensor_peak_gb()))
  return rows, info


def format_table(rows):
  lines = [f'{"part":<8} {"images/s":>10} {"s/call":>9} {"peak RSS GB":>12} '
           f'{"tensor peak GB":>15}']
  for part, rate, seconds, peak, tensors in rows:
    tensors = 'unavailable' if tensors is None else f'{tensors:.2f}'
    lines.append(f'{part:<8} {rate:>10.2f} {seconds:>9.3f} {peak:>12.2f} {tensors:>15}')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments (not flags): {" ".join(argv[1:])}')
  unknown = sorted(set(FLAGS.parts) - set(PARTS))
  if unknown:
    raise app.UsageError(f'--parts: unknown {", ".join(unknown)}; known: {", ".join(PARTS)}.')
  config = build_config(FLAGS)
  load_before = os.getloadavg()
  rows, info = run_benchmark(config, FLAGS.batch_size, FLAGS.parts, FLAGS.steps, FLAGS.warmup,
                             FLAGS.jit_compile, FLAGS.optimizer, FLAGS.learning_rate, FLAGS.seed)
  load_after = os.getloadavg()
  print(f'model={config.model} image_shape={config.image_shape} batch_size={FLAGS.batch_size} '
        f'conditioner_precision={config.conditioner_precision} jit_compile={FLAGS.jit_compile} '
        f'steps={FLAGS.steps} warmup={FLAGS.warmup}')
  print(f'trainable parameters: {info["parameters"]:,}; build {info["build_s"]:.1f} s; '
        f'peak RSS after import tensorflow {RSS_AFTER_IMPORT_GB:.2f} GB, after build '
        f'{info["peak_after_build_gb"]:.2f} GB')
  print(f'TF threads: intra-op {tf.config.threading.get_intra_op_parallelism_threads()} '
        f'inter-op {tf.config.threading.get_inter_op_parallelism_threads()} '
        f'(0: all cores); CPUs: {os.cpu_count()}')
  print(format_table(rows))
  print('load average (1, 5, 15 min): before ' + ', '.join(f'{v:.2f}' for v in load_before)
        + '; after ' + ', '.join(f'{v:.2f}' for v in load_after))


if __name__ == '__main__':
  app.run(main)
