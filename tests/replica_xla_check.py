"""Run by tests/test_distributed.py in a fresh process (logical CPU devices must be configured
before TensorFlow starts): the same tiny Glow trained two steps on the same global batches

  * on one device, Keras compiling the whole train step with XLA (jit_compile=True), and
  * under MirroredStrategy over 2 logical CPU devices, each replica's forward and backward
    pass XLA-compiled (replica_jit_compile), the all-reduce and update outside XLA,

with gradient clipping active (so the clip must use the norm of the global gradient). Prints
one JSON line: the largest difference of any variable, the losses and the trace counts.
"""

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import tfflows  # noqa: E402  pylint: disable=wrong-import-position
from tfflows import optimizers  # noqa: E402  pylint: disable=wrong-import-position

CONFIG = tfflows.FlowConfig(model='glow', image_shape=(8, 8, 1), num_levels=1,
                            steps_per_level=1, width=4)
GLOBAL_BATCH = 8
IMAGES = np.random.RandomState(0).randint(0, 256, (3 * GLOBAL_BATCH, 8, 8, 1)).astype(np.uint8)


def train(strategy, per_replica_xla):
  keras.utils.set_random_seed(1)
  with strategy.scope():
    model = tfflows.build_model(CONFIG)
    model.compile(optimizers.FusedAdamax(1e-3), max_grad_norm=0.05, jit_compile=True)
    assert model.replica_jit_compile == per_replica_xla
    model.optimizer.build(model.trainable_variables)
    # ActNorm's data-dependent initialisation on one global batch, in cross-replica context.
    model(tf.cast(IMAGES[:GLOBAL_BATCH], tf.float32), training=True)
  batches = tf.data.Dataset.from_tensor_slices(IMAGES[GLOBAL_BATCH:]).batch(GLOBAL_BATCH)
  history = model.fit(batches, epochs=1, verbose=0, shuffle=False).history
  compiled = model.__dict__.get('_replica_step_compiled')
  traces = compiled.experimental_get_tracing_count() if compiled is not None else 0
  return [v.numpy() for v in model.variables], history, traces


def main():
  single, single_history, _ = train(tf.distribute.get_strategy(), False)
  mirrored = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
  replicas, replica_history, traces = train(mirrored, True)
  difference = max(float(np.max(np.abs(a.astype(np.float64) - b), initial=0.))
                   for a, b in zip(single, replicas))
  moved = max(float(np.max(np.abs(a.astype(np.float64)), initial=0.)) for a in single)
  print(json.dumps({'max_difference': difference, 'num_variables': len(single),
                    'largest_value': moved, 'replica_traces': traces,
                    'num_replicas': mirrored.num_replicas_in_sync,
                    'single': {k: float(v[-1]) for k, v in single_history.items()},
                    'mirrored': {k: float(v[-1]) for k, v in replica_history.items()}}))


if __name__ == '__main__':
  main()
