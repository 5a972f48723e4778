"""Several replicas and workers: noise rows, input shards, XLA per replica, and real 2-worker
runs of train.main on 127.0.0.1.

The multi-process tests are slow (each worker process starts TensorFlow and compiles the
step); run them with

    python -m pytest -q -m slow -n 0 -k multiworker tests/test_distributed.py
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tfflows
from tfflows import optimizers
from tfflows import random
from tfflows.data import imagenet_npz
from tfflows.data import pipeline
from tfflows.data import sharding
from tfflows.data import tfds_datasets
from train import checkpoint_files
from train import distributed
from train import modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.flags')


# ------------------------------------------------------------------------- noise per replica
@pytest.mark.parametrize('draw', [random.uniform, random.normal])
@pytest.mark.parametrize('jit_compile', [False, True])
def test_replica_rows_are_the_rows_of_the_global_draw(draw, jit_compile):
  """Replica r of 3 drawing [2, 4, 3] gets rows 2r, 2r + 1 of the [6, 4, 3] draw from the
  same seed (stateless seed and SeedGenerator alike), also inside XLA."""
  def global_and_parts(seeds):
    full = draw(tf.constant([6, 4, 3]), seeds[0])
    parts = []
    for r in range(3):
      with random.replica_rows(r, 3):
        parts.append(draw(tf.constant([2, 4, 3]), seeds[1 + r]))
    return full, tf.concat(parts, 0)

  stateless = [tf.constant([3, 4])] * 4
  generators = [keras.random.SeedGenerator(5) for _ in range(4)]  # the same state each
  for seeds in (stateless, generators):
    full, parts = tf.function(global_and_parts, jit_compile=jit_compile)(seeds)
    np.testing.assert_array_equal(parts.numpy(), full.numpy())
  with random.replica_rows(0, 1):  # one replica: the plain draw
    np.testing.assert_array_equal(draw([2, 3], tf.constant([1, 2])),
                                  draw([2, 3], tf.constant([1, 2])))
  with pytest.raises(ValueError, match='num_replicas'):
    with random.replica_rows(0, 0):
      pass


# ---------------------------------------------------------------------------- input shards
def _images(ds):
  return np.concatenate([b for b in ds.as_numpy_iterator()])


def test_embedded_shards_partition_the_split_by_element():
  kwargs = dict(augment=(), repeat=False, drop_remainder=False)
  x = pipeline.make_dataset('mnist_embedded', 'test', 50, shuffle=False, **kwargs)
  everything = _images(x)
  for i in range(3):
    part = _images(pipeline.make_dataset('mnist_embedded', 'test', 10, shuffle=False,
                                         num_shards=3, shard_index=i, **kwargs))
    np.testing.assert_array_equal(part, everything[i::3])
  # Shuffled: each shard shuffles its own elements with its own seed; one epoch of the shards
  # together is one epoch of the split.
  parts = [_images(pipeline.make_dataset('mnist_embedded', 'test', 10, deterministic=True,
                                         seed=7, num_shards=2, shard_index=i, **kwargs))
           for i in range(2)]
  rows = lambda a: sorted(r.tobytes() for r in a.reshape(len(a), -1))  # noqa: E731
  assert rows(np.concatenate(parts)) == rows(everything)
  assert not np.array_equal(parts[0], everything[0::2])  # shuffled
  with pytest.raises(ValueError, match='shard_index'):
    pipeline.make_dataset('mnist_embedded', 'test', 10, num_shards=2, shard_index=2)


def _write_npz(path, images):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  np.savez(path, data=rows, labels=np.ones(len(images), np.int64))


def test_npz_shards_by_file_when_the_files_divide_evenly_else_by_element(tmp_path):
  marked = np.zeros((8, 32, 32, 3), np.uint8)
  marked[:, 0, 0, 0] = np.arange(8)  # image k of the stream carries k
  for f in range(4):  # train_data_batch_1..4, two images each
    _write_npz(str(tmp_path / f'train_data_batch_{f + 1}.npz'), marked[2 * f:2 * f + 2])

  def marks(shard):
    ds = imagenet_npz.load_imagenet_npz('train', 32, str(tmp_path), shard=shard)
    return [int(image[0, 0, 0]) for image, _ in ds.as_numpy_iterator()]

  assert marks(None) == list(range(8))
  assert marks((2, 0)) == [0, 1, 4, 5] and marks((2, 1)) == [2, 3, 6, 7]  # files 1, 3 / 2, 4
  assert marks((3, 1)) == [1, 4, 7]  # 4 files over 3 shards: by element
  assert sharding.shard_files(['a', 'b', 'c'], (3, 2)) == (['c'], True)
  assert sharding.shard_files(['a', 'b', 'c'], (2, 1)) == (['a', 'b', 'c'], False)


def test_tfds_shards_by_file_when_the_files_divide_evenly_else_by_even_ranges(tmp_path):
  """A real TFDS dataset of 12 examples in 4 files, read by TFDS as the pipeline does."""
  class ShardedToy(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(2, 2, 1))}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(12):
        yield i, {'image': np.full((2, 2, 1), i, np.uint8)}

  ShardedToy(data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=4))

  def read(shard):
    split, context = tfds_datasets.shard_split(tfds, 'sharded_toy', 'train', str(tmp_path),
                                               shard)
    config = tfds.ReadConfig(input_context=context) if context else None
    ds = tfds.load('sharded_toy', split=split, data_dir=str(tmp_path), read_config=config)
    return context is not None, sorted(int(e['image'][0, 0, 0]) for e in ds)

  for shards, by_file in ((2, True), (4, True), (3, False)):
    parts = [read((shards, i)) for i in range(shards)]
    assert all(f == by_file for f, _ in parts)
    assert sorted(sum((p for _, p in parts), [])) == list(range(12))
    assert all(len(p) == 12 // shards for _, p in parts)


# ---------------------------------------------------------------------------- XLA per replica
XLA_CONFIG = dict(model='glow', image_shape=(8, 8, 1), num_levels=1, steps_per_level=1, width=4)


def _train_two_steps(strategy, images, global_batch):
  """The tiny Glow trained two Adamax steps (clipping at 0.05) over images[global_batch:] with
  jit_compile=True: (variables, history, traces of the per-replica XLA step)."""
  keras.utils.set_random_seed(1)
  with strategy.scope():
    model = tfflows.build_model(tfflows.FlowConfig(**XLA_CONFIG))
    model.compile(optimizers.FusedAdamax(1e-3), max_grad_norm=0.05, jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    # ActNorm's data-dependent initialisation on one global batch, in cross-replica context.
    model(tf.cast(images[:global_batch], tf.float32), training=True)
  batches = tf.data.Dataset.from_tensor_slices(images[global_batch:]).batch(global_batch)
  history = model.fit(batches, epochs=1, verbose=0, shuffle=False).history
  compiled = model.__dict__.get('_replica_step_compiled')
  traces = compiled.experimental_get_tracing_count() if compiled is not None else 0
  return [v.numpy() for v in model.variables], history, traces, model.replica_jit_compile


def test_xla_per_replica_under_mirrored_matches_the_single_device_xla_step():
  """Two Adamax steps (gradient clipping active, so the clip must use the norm of the global
  gradient) of a tiny Glow on the 2 logical CPU devices (tests/conftest.py), each replica's
  forward and backward one XLA program, against Keras' whole-step XLA on one device over the
  same global batches: compile(jit_compile=True) picks which from the strategy."""
  global_batch = 8
  images = np.random.RandomState(0).randint(0, 256, (3 * global_batch, 8, 8, 1)).astype(np.uint8)
  single, single_history, _, single_per_replica = _train_two_steps(
      tf.distribute.get_strategy(), images, global_batch)
  mirrored = distributed.make_strategy('mirrored')   # the process's one MirroredStrategy
  replicas, mirrored_history, traces, per_replica = _train_two_steps(mirrored, images,
                                                                     global_batch)
  assert (single_per_replica, per_replica) == (False, True)
  assert mirrored.num_replicas_in_sync == 2 and traces == 2  # one XLA program a replica
  difference = max(float(np.max(np.abs(a.astype(np.float64) - b), initial=0.))
                   for a, b in zip(single, replicas))
  assert difference < 1e-6, difference  # weights of order 1; lr 1e-3
  for key in ('bpd', 'loss', 'grad_norm'):
    np.testing.assert_allclose(mirrored_history[key][-1], single_history[key][-1], rtol=1e-5)
  assert single_history['grad_norm'][-1] > 0.05  # the clip (max_grad_norm 0.05) was active


def test_multiworker_strategy_constructs_from_tf_config():
  """A one-worker cluster: MultiWorkerMirroredStrategy reads TF_CONFIG (collective ops must be
  configured at program start, hence a fresh process)."""
  tf_config = json.dumps({'cluster': {'worker': ['localhost:0']},
                          'task': {'type': 'worker', 'index': 0}})
  code = ('from train import distributed; s = distributed.make_strategy("multiworker"); '
          'print(type(s).__name__, s.num_replicas_in_sync, distributed.is_chief(s))')
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2', TF_CONFIG=tf_config)
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'CollectiveAllReduceStrategy 1 (True, 0)' in result.stdout  # its class name in TF 2


# ------------------------------------------------------------------ 2 workers on 127.0.0.1
def _start_workers(workdir, args, tmpdir, ports=None):
  """Two `python -m train.main --strategy=multiworker` processes, TF_CONFIG with both workers
  on 127.0.0.1, one CPU device each; TMPDIR=tmpdir for their temporary files."""
  ports = ports or distributed.free_local_ports(2)
  os.makedirs(tmpdir, exist_ok=True)
  processes = []
  for index in range(2):
    tf_config = {'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
                 'task': {'type': 'worker', 'index': index}}
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2', TMPDIR=str(tmpdir),
               TF_CONFIG=json.dumps(tf_config))
    log = open(os.path.join(tmpdir, f'worker{index}.log'), 'w+', encoding='utf-8')
    processes.append((subprocess.Popen(
        [sys.executable, '-m', 'train.main', f'--flagfile={TINY}', f'--workdir={workdir}',
         '--strategy=multiworker', *args],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return processes


def _finish(processes, timeout=900):
  """(return codes, logs) once both workers exit (killed after timeout)."""
  codes, logs = [], []
  for process, log in processes:
    try:
      codes.append(process.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      process.kill()
      codes.append(process.wait())
    log.seek(0)
    logs.append(log.read())
    log.close()
  return codes, logs


def _checkpoint_tensors(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
          if 'OBJECT_GRAPH' not in k}


@pytest.mark.slow
def test_multiworker_two_processes_equal_mirrored_two_devices_and_only_the_chief_writes(
    tmp_path):
  args = ['--deterministic', '--epochs=1', '--steps_per_epoch=3', '--eval_batches=2',
          '--mode=train,eval,sample']
  codes, logs = _finish(_start_workers(tmp_path / 'workers', args, tmp_path / 'tmp'))
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  # Both workers end with bit-identical weights and optimizer state.
  digests = [re.findall(r'2 workers hold identical weights and optimizer state \(sha256 (\w+)\)',
                        log) for log in logs]
  assert digests[0] and digests[0] == digests[1]
  # ... equal to one process of MirroredStrategy over 2 logical CPU devices.
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  mirrored = subprocess.run(
      [sys.executable, '-m', 'train.main', f'--flagfile={TINY}', f'--workdir={tmp_path / "one"}',
       '--strategy=mirrored', '--num_cpu_devices=2', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert mirrored.returncode == 0, mirrored.stderr[-3000:]
  ours = _checkpoint_tensors(str(tmp_path / 'workers' / 'checkpoints' / 'ckpt-3'))
  theirs = _checkpoint_tensors(str(tmp_path / 'one' / 'checkpoints' / 'ckpt-3'))
  assert sorted(ours) == sorted(theirs) and len(ours) > 50
  for key, value in ours.items():
    np.testing.assert_allclose(value, theirs[key], rtol=0, atol=1e-7, err_msg=key)
  # The eval spread over 2 workers gives the single-process figures.
  with open(modes.result_path(tmp_path / 'workers', 'eval', 3, k=4, num_images=32),
            encoding='utf-8') as f:
    ours = json.load(f)
  with open(modes.result_path(tmp_path / 'one', 'eval', 3, k=4, num_images=32),
            encoding='utf-8') as f:
    theirs = json.load(f)
  for key in ('num_images', 'bits_per_dim_bound', 'bits_per_dim_iw'):
    assert ours[key] == theirs[key], key
  # Only the chief wrote the workdir; worker 1 wrote its checkpoint copies under TMPDIR and
  # removed them; the chief-only mode ran on the chief only.
  assert sorted(os.listdir(tmp_path / 'workers')) == sorted(os.listdir(tmp_path / 'one'))
  for sub in ('train', 'test'):
    assert len(glob.glob(str(tmp_path / 'workers' / 'tensorboard' / sub / 'events.*'))) == 1
  scratch = re.findall(r'saved (\S+)/checkpoints/ckpt-3', logs[1])
  assert scratch and scratch[0].startswith(str(tmp_path / 'tmp' / 'tfflows_'))
  assert not os.path.exists(scratch[0])
  assert not glob.glob(str(tmp_path / 'tmp' / 'tfflows_*'))
  assert '--mode=sample: runs on the chief only' in logs[1]
  assert f'saved {tmp_path / "workers"}/checkpoints/ckpt-3' in logs[0]


def _wait_for_checkpoint(workdir, step, processes, deadline_seconds=900):
  deadline = time.time() + deadline_seconds
  while time.time() < deadline:
    prefix = tf.train.latest_checkpoint(os.path.join(workdir, 'checkpoints'))
    if prefix and checkpoint_files.step_of(prefix) >= step:
      return
    assert all(p.poll() is None for p, _ in processes), 'a worker exited early'
    time.sleep(0.2)
  raise AssertionError(f'no checkpoint of step {step} in {deadline_seconds} s')


@pytest.mark.slow
def test_multiworker_sigkill_stops_the_survivor_and_a_rerun_resumes(tmp_path):
  workdir = tmp_path / 'run'
  args = ['--epochs=1', '--steps_per_epoch=400', '--checkpoint_every_steps=5',
          '--nojit_compile', '--mode=train']
  processes = _start_workers(workdir, args, tmp_path / 'tmp')
  try:
    _wait_for_checkpoint(str(workdir), 10, processes)
  finally:
    processes[1][0].send_signal(signal.SIGKILL)
  killed = time.time()
  codes, logs = _finish(processes, timeout=300)
  assert codes[0] == 1 and time.time() - killed < 120, logs[0][-3000:]
  latest = checkpoint_files.step_of(tf.train.latest_checkpoint(str(workdir / 'checkpoints')))
  assert latest >= 10 and latest % 5 == 0
  assert 'a worker of the multi-worker run was lost' in logs[0]
  assert f"last checkpoint is {workdir}/checkpoints/ckpt-{latest}." in logs[0]
  # The same command on both workers resumes from the chief's last checkpoint: at most the 4
  # steps after it (one checkpoint interval) are trained again.
  args[1] = f'--steps_per_epoch={latest + 2}'
  codes, logs = _finish(_start_workers(workdir, args, tmp_path / 'tmp'))
  assert codes == [0, 0], '\n'.join(log[-3000:] for log in logs)
  for log in logs:
    assert f'resumed from {workdir}/checkpoints/ckpt-{latest}; step {latest} ' in log
    assert f'train done: step {latest + 2} (2 this run)' in log
    assert 'identical weights and optimizer state' in log


@pytest.mark.slow
def test_multiworker_frozen_worker_is_declared_lost_after_the_heartbeat_timeout(tmp_path):
  """SIGSTOP keeps the worker's connections open but stops its heartbeats: only the
  coordination service's heartbeat timeout (--worker_timeout_seconds) can stop the chief."""
  workdir = tmp_path / 'run'
  args = ['--epochs=1', '--steps_per_epoch=400', '--checkpoint_every_steps=5',
          '--nojit_compile', '--mode=train', '--worker_timeout_seconds=5']
  processes = _start_workers(workdir, args, tmp_path / 'tmp')
  try:
    _wait_for_checkpoint(str(workdir), 5, processes)
    processes[1][0].send_signal(signal.SIGSTOP)
    stopped = time.time()
    code = processes[0][0].wait(timeout=300)
    waited = time.time() - stopped
  finally:
    processes[1][0].kill()
  _, logs = _finish(processes, timeout=60)
  assert code == 1 and waited < 120, logs[0][-3000:]
  assert 'a worker of the multi-worker run was lost' in logs[0]
  assert 'stopped sending heartbeats' in logs[0]


def test_lost_worker_message_names_the_cause_and_the_checkpoint():
  error = tf.errors.UnavailableError(None, None, 'Graph execution error:\n\nDetected at node '
                                     'x\nrecvmsg:Connection reset by peer\nAdditional GRPC ...')
  message = distributed.worker_lost_message(error, '/w/checkpoints/ckpt-10')
  assert 'UnavailableError: recvmsg:Connection reset by peer' in message
  assert "The chief's last checkpoint is /w/checkpoints/ckpt-10." in message
  assert 'No checkpoint was written yet.' in distributed.worker_lost_message(error, None)


@pytest.mark.slow  # about 30 s on 2 cores: two TF programs' start-up and tracing
def test_scaling_benchmark_runs():
  """python -m train.benchmark_scaling (one device and 2 mirrored replicas, tiny config) runs
  to its table: the program behind the scaling figures of docs/results.md."""
  out = subprocess.run(
      [sys.executable, '-m', 'train.benchmark_scaling', '--flagfile=configs/tiny.flags',
       '--configurations=one,mirrored', '--steps=1', '--warmup=1', '--batch_size=4'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert any(line.startswith('one ') for line in lines)
  assert any(line.startswith('mirrored ') for line in lines)
