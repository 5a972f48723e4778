r"""Training throughput on 1 device, on 2 devices of one process, and on 2 worker processes.

    python -m train.benchmark_scaling --flagfile=configs/denseflow_small.flags [--steps=N]

Runs, back to back in fresh processes, the same model (from the flags, as ``train.benchmark``)
at the same global batch ``--batch_size`` on random uint8 images (no data is read):

    one        one device (no strategy): FlowModel.train_step, whole step as one tf.function
    mirrored   MirroredStrategy over 2 logical CPU devices (or the local GPUs) in one process
    workers    MultiWorkerMirroredStrategy: 2 processes on 127.0.0.1, one device each

and prints images/s of the training step (``strategy.run(model.train_step)`` as Keras runs it)
and its split into the replica's forward and backward pass alone (``compute``: what each
replica computes, timed under the same strategy) and the all-reduce of the gradients alone
(``all-reduce``: ``mean_over_replicas`` of gradient-shaped tensors, each replica's copies of
the trainable variables). What is left of a step (optimizer update, clipping, the per-step
dispatch) is ``step - compute - all-reduce``; on a shared CPU the parts overlap and contend,
so it can come out negative. With
--jit_compile each replica's forward and backward pass is one XLA program (one device: Keras'
whole-step XLA). The load average is printed: on a shared machine only ratios within one run
of this program mean anything.
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position
from absl import app  # noqa: E402  pylint: disable=wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from train import benchmark  # noqa: E402  pylint: disable=wrong-import-position  (its flags)

FLAGS = flags.FLAGS
CONFIGURATIONS = ('one', 'mirrored', 'workers')
flags.DEFINE_list('configurations', list(CONFIGURATIONS), 'What to measure: one, mirrored, '
                  'workers.')
flags.DEFINE_string('scaling_role', '', 'Internal: the configuration this process measures.')


def _measure(configuration):
  """Runs in a child process: returns the timings of one configuration as a dict."""
  from tfflows.models import replica_step  # pylint: disable=import-outside-toplevel
  from train import distributed  # pylint: disable=import-outside-toplevel
  from train import trainer  # pylint: disable=import-outside-toplevel
  import keras  # pylint: disable=import-outside-toplevel
  import tfflows  # pylint: disable=import-outside-toplevel

  strategy = distributed.make_strategy({'one': 'default', 'mirrored': 'mirrored',
                                        'workers': 'multiworker'}[configuration])
  replicas = strategy.num_replicas_in_sync
  config = benchmark.build_config(FLAGS)
  keras.utils.set_random_seed(FLAGS.seed)
  with strategy.scope():
    model = tfflows.build_model(config)
    model.compile(trainer.make_optimizer(FLAGS.optimizer, FLAGS.learning_rate),
                  jit_compile=bool(FLAGS.jit_compile))
    model.optimizer.build(model.trainable_variables)
  rng = np.random.RandomState(FLAGS.seed)
  batch = FLAGS.batch_size // replicas
  images = strategy.experimental_distribute_values_from_function(
      lambda context: tf.constant(rng.randint(0, 256, (batch,) + tuple(config.image_shape)),
                                  tf.uint8))
  images = images if replicas > 1 else strategy.experimental_local_results(images)[0]
  jit_whole = bool(FLAGS.jit_compile and not model.replica_jit_compile)

  @tf.function(jit_compile=jit_whole)
  def step(x):
    return strategy.run(model.train_step, args=(x,))

  @tf.function(jit_compile=jit_whole)
  def compute(x):
    return strategy.run(lambda v: replica_step.loss_and_gradients(
        model, tf.cast(v, tf.float32))[2], args=(x,))

  @tf.function
  def all_reduce(unused):
    # Gradient-shaped tensors: each replica's copies of the trainable variables.
    return strategy.run(lambda: replica_step.mean_over_replicas(
        [tf.identity(v) for v in model.trainable_variables]))

  out = {'configuration': configuration, 'replicas': replicas,
         'workers': distributed.num_workers(strategy), 'global_batch': FLAGS.batch_size,
         'jit_compile': FLAGS.jit_compile}
  def local(fn):  # the values of this process's replicas, so that the timing reads them back
    return lambda x: [strategy.experimental_local_results(v) for v in tf.nest.flatten(fn(x))]

  for name, fn, arg in (('step', step, images), ('compute', compute, images),
                        ('all_reduce', all_reduce, images)):
    out[f'{name}_s'] = benchmark.seconds_per_call(local(fn), (arg,), FLAGS.warmup, FLAGS.steps)
  out['images_per_s'] = FLAGS.batch_size / out['step_s']
  out['gradient_mb'] = sum(int(np.prod(v.shape)) for v in model.trainable_variables) * 4 / 1e6
  return out


def _children(configuration, argv):
  """The child processes of one configuration; each prints one JSON line last."""
  base = [sys.executable, '-m', 'train.benchmark_scaling', *argv[1:],
          f'--scaling_role={configuration}']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('TF_CONFIG', None)
  if configuration == 'one':
    return [subprocess.Popen(base, env=env, stdout=subprocess.PIPE, text=True)]
  if configuration == 'mirrored':
    return [subprocess.Popen(base + ['--num_cpu_devices=2'], env=env, stdout=subprocess.PIPE,
                             text=True)]
  from train import distributed  # pylint: disable=import-outside-toplevel
  ports = distributed.free_local_ports(2)
  processes = []
  for index in range(2):
    tf_config = {'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
                 'task': {'type': 'worker', 'index': index}}
    processes.append(subprocess.Popen(base, env=dict(env, TF_CONFIG=json.dumps(tf_config)),
                                      stdout=subprocess.PIPE, text=True))
  return processes


def main(argv):
  if FLAGS.scaling_role:
    if FLAGS.num_cpu_devices > 1:
      cpu = tf.config.list_physical_devices('CPU')[0]
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * FLAGS.num_cpu_devices)
    print(json.dumps(_measure(FLAGS.scaling_role)), flush=True)
    return
  unknown = sorted(set(FLAGS.configurations) - set(CONFIGURATIONS))
  if unknown:
    raise app.UsageError(f'--configurations: unknown {", ".join(unknown)}.')
  load_before = os.getloadavg()
  rows = []
  for configuration in FLAGS.configurations:
    started = time.perf_counter()
    processes = _children(configuration, sys.argv)
    outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
      codes = [p.returncode for p in processes]
      raise SystemExit(f'{configuration}: a child failed (exit codes {codes})')
    rows.append(json.loads(outputs[0].strip().splitlines()[-1]))
    rows[-1]['wall_s'] = time.perf_counter() - started
    print(json.dumps(rows[-1]), flush=True)
  load_after = os.getloadavg()
  print(f'model={FLAGS.model} batch_size={FLAGS.batch_size} (global) jit_compile='
        f'{FLAGS.jit_compile} steps={FLAGS.steps} warmup={FLAGS.warmup} CPUs={os.cpu_count()}')
  print(f'{"configuration":<14} {"workers":>7} {"replicas":>8} {"images/s":>9} {"s/step":>8} '
        f'{"compute s":>10} {"all-reduce s":>12} {"rest s":>7}')
  for r in rows:
    rest = r['step_s'] - r['compute_s'] - r['all_reduce_s']
    print(f'{r["configuration"]:<14} {r["workers"]:>7} {r["replicas"]:>8} '
          f'{r["images_per_s"]:>9.2f} {r["step_s"]:>8.3f} {r["compute_s"]:>10.3f} '
          f'{r["all_reduce_s"]:>12.3f} {rest:>7.3f}')
  print(f'gradient: {rows[0]["gradient_mb"]:.1f} MB float32 per all-reduce')
  print('load average (1, 5, 15 min): before ' + ', '.join(f'{v:.2f}' for v in load_before)
        + '; after ' + ', '.join(f'{v:.2f}' for v in load_after))


if __name__ == '__main__':
  app.run(main)
