r"""Throughput and memory of a model built from a flagfile: training, evaluation, sampling.

    python -m train.benchmark --flagfile=configs/denseflow_small.flags [--batch_size=B]
        [--steps=N] [--parts=train,eval,sample] [--nojit_compile] [--remat=step]
        [--conditioner_precision=auto|float32|bfloat16]

The model comes from the same flags as ``train.main`` (``train/flags.py``; ``--remat`` and
``--conditioner_precision`` are model flags); the images are random uint8 batches of the
dataset's shape (no data is read), so only the computation is measured. For each part, after ``--warmup`` untimed calls (the first one traces and compiles):

    train    images/s of the compiled training step: ``FlowModel.train_step`` (forward, backward,
             Adamax update) as one ``tf.function`` with ``jit_compile`` from ``--jit_compile``,
             i.e. what ``model.fit`` runs each step.
    eval     images/s of the one-sample log-likelihood (``FlowModel.estimate_log_prob`` with
             k = 1: dequantization, augmentation noise, flow, prior) as one ``tf.function``
             with the same ``jit_compile``.
    sample   images/s of drawing uint8 images at temperature 1 (top-down prior sampling and the
             inverse flow) as one ``tf.function`` with the same ``jit_compile``.

Each timed part runs ``--steps`` calls and reads the result back to the host once at the end;
besides wall-clock seconds per call it reports the process's CPU seconds per call (all threads;
``time.process_time``), which other processes on a shared machine disturb less.
What building the compiled function costs, per part:

    trace s      tracing the Python function into a TensorFlow graph (``get_concrete_function``)
    first call s the first call after tracing: graph optimisation and kernel instantiation
                 (or, with ``--jit_compile``, XLA's compilation) plus one run
    graph ops    operations of the traced graph, counting the body of every function it calls
                 (while-loop bodies and conditions, their gradients) once (the JSON record also
                 has the top level alone, which leaves loop bodies out)
    HLO MB       with ``--jit_compile``: the size of the XLA program (the HLO text that
                 TensorFlow lowers the graph to, before XLA's optimisation passes)

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

import collections
import json
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
flags.DEFINE_string('json_out', '', 'Also append the rows and settings as one JSON line to this '
                    'file (for comparing runs).')


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


Row = collections.namedtuple('Row', ['part', 'images_per_s', 's_per_call', 'cpu_s_per_call',
                                     'trace_s', 'first_call_s', 'graph_ops', 'top_level_ops',
                                     'hlo_mb', 'peak_rss_gb', 'tensor_peak_gb'])


def graph_op_count(concrete_function):
  """Operations of a traced function's graph, counting every function it calls (while bodies,
  conditions, branches, gradients) once."""
  graph_def = concrete_function.graph.as_graph_def()
  library = {f.signature.name: f for f in graph_def.library.function}
  seen, total = set(), 0
  pending = [graph_def.node]
  while pending:
    nodes = pending.pop()
    total += len(nodes)
    for node in nodes:
      names = [node.op] if node.op in library else []
      for value in node.attr.values():
        if value.HasField('func'):
          names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
      for name in names:
        if name in library and name not in seen:
          seen.add(name)
          pending.append(library[name].node_def)
  return total


def seconds_per_call(fn, args, warmup, steps):
  """Seconds per call of fn(*args) after ``warmup`` calls; one host read-back at the end."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  if out is not None:
    tf.nest.map_structure(lambda t: t.numpy(), out)
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  tf.nest.map_structure(lambda t: t.numpy(), out)
  return (time.perf_counter() - start) / steps


def _measure(part, fn, args, batch_size, warmup, steps, jit_compile):
  """A Row for fn(*args): trace, first call, warm-up, timed calls, program size."""
  reset_tensor_peak()
  start = time.perf_counter()
  concrete = fn.get_concrete_function(*args)
  trace_s = time.perf_counter() - start
  ops = graph_op_count(concrete)
  top_level_ops = len(concrete.graph.get_operations())
  # Printed at once, so that a run stopped during a long compilation still reports them.
  print(f'{part}: traced in {trace_s:.1f} s, {ops} graph ops; first call...', flush=True)
  start = time.perf_counter()
  tf.nest.map_structure(lambda t: t.numpy(), fn(*args))
  first_call_s = time.perf_counter() - start
  print(f'{part}: first call {first_call_s:.1f} s; peak RSS {peak_memory_gb():.2f} GB',
        flush=True)
  out = None
  for _ in range(warmup - 1):
    out = fn(*args)
  if out is not None:
    tf.nest.map_structure(lambda t: t.numpy(), out)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    out = fn(*args)
  tf.nest.map_structure(lambda t: t.numpy(), out)
  seconds = (time.perf_counter() - start) / steps
  cpu_seconds = (time.process_time() - cpu) / steps
  peak, tensors = peak_memory_gb(), tensor_peak_gb()
  hlo_mb = None
  if jit_compile:
    hlo_mb = len(fn.experimental_get_compiler_ir(*args)(stage='hlo')) / 1e6
  return Row(part, batch_size / seconds, seconds, cpu_seconds, trace_s, first_call_s, ops,
             top_level_ops, hlo_mb, peak, tensors)


def run_benchmark(config, batch_size, parts, steps, warmup, jit_compile, optimizer='adamax',
                  learning_rate=1e-3, seed=0):
  """Returns (rows, info): a ``Row`` per part (images/s, seconds per call, trace and first-call
  seconds, graph ops, HLO MB with jit_compile (None without), peak RSS GB so far, tensor peak GB
  of the part or None where unavailable)."""
  keras.utils.set_random_seed(seed)
  start = time.perf_counter()
  model = tfflows.build_model(config)
  info = {'build_s': time.perf_counter() - start,
          'parameters': int(sum(np.prod(v.shape) for v in model.trainable_variables)),
          'peak_after_build_gb': peak_memory_gb(),
          'network_precision': getattr(model, 'network_precision', 'float32')}
  rng = np.random.RandomState(seed)
  images = tf.constant(rng.randint(0, 256, (batch_size,) + tuple(config.image_shape)),
                       tf.float32)
  rows = []
  if 'train' in parts:
    model.compile(trainer.make_optimizer(optimizer, learning_rate), jit_compile=jit_compile)
    model.optimizer.build(model.trainable_variables)
    step = tf.function(model.train_step, jit_compile=jit_compile)
    rows.append(_measure('train', step, (images,), batch_size, warmup, steps, jit_compile))
  if 'eval' in parts:
    evaluate = tf.function(lambda x: model.estimate_log_prob(x, 1), jit_compile=jit_compile,
                           autograph=False)
    rows.append(_measure('eval', evaluate, (images,), batch_size, warmup, steps, jit_compile))
  if 'sample' in parts:
    sample = tf.function(lambda seed: to_images(model.sample_values(batch_size, 1.0, seed)),
                         jit_compile=jit_compile, autograph=False)
    rows.append(_measure('sample', sample, (tf.constant([seed, 1], tf.int32),), batch_size,
                         warmup, steps, jit_compile))
  return rows, info


def format_table(rows):
  lines = [f'{"part":<8} {"images/s":>10} {"s/call":>9} {"CPU s/call":>11} {"trace s":>9} '
           f'{"first call s":>13} {"graph ops":>10} {"HLO MB":>8} {"peak RSS GB":>12} '
           f'{"tensor peak GB":>15}']
  for r in rows:
    lines.append(f'{r.part:<8} {r.images_per_s:>10.2f} {r.s_per_call:>9.3f} '
                 f'{r.cpu_s_per_call:>11.3f} {r.trace_s:>9.1f} {r.first_call_s:>13.1f} '
                 f'{r.graph_ops:>10d} {_number(r.hlo_mb, 8, "-")} {r.peak_rss_gb:>12.2f} '
                 f'{_number(r.tensor_peak_gb, 15, "unavailable")}')
  return '\n'.join(lines)


def _number(value, width, missing):
  """``value`` to 2 decimals, right-aligned in ``width``; ``missing`` for None."""
  if value is None:
    return f'{missing:>{width}}'
  return f'{value:>{width}.2f}'


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
        f'conditioner_precision={config.conditioner_precision} (networks compute in '
        f'{info["network_precision"]}) remat={config.remat} '
        f'jit_compile={FLAGS.jit_compile} steps={FLAGS.steps} warmup={FLAGS.warmup}')
  print(f'trainable parameters: {info["parameters"]:,}; build {info["build_s"]:.1f} s; '
        f'peak RSS after import tensorflow {RSS_AFTER_IMPORT_GB:.2f} GB, after build '
        f'{info["peak_after_build_gb"]:.2f} GB')
  print(f'TF threads: intra-op {tf.config.threading.get_intra_op_parallelism_threads()} '
        f'inter-op {tf.config.threading.get_inter_op_parallelism_threads()} '
        f'(0: all cores); CPUs: {os.cpu_count()}')
  print(format_table(rows))
  print('load average (1, 5, 15 min): before ' + ', '.join(f'{v:.2f}' for v in load_before)
        + '; after ' + ', '.join(f'{v:.2f}' for v in load_after))
  if FLAGS.json_out:
    record = dict(config=config.to_dict(), batch_size=FLAGS.batch_size,
                  jit_compile=FLAGS.jit_compile, info=info, load_before=load_before,
                  load_after=load_after, rows=[r._asdict() for r in rows])
    with open(FLAGS.json_out, 'a', encoding='utf-8') as out:
      out.write(json.dumps(record) + '\n')


if __name__ == '__main__':
  app.run(main)
