"""Several devices and workers: the strategy, who writes, each replica's input, one state.

    --strategy=default       one device
    --strategy=mirrored      MirroredStrategy: the local GPUs, else every logical CPU device
    --strategy=multiworker   MultiWorkerMirroredStrategy over the cluster of TF_CONFIG; every
                             worker runs the same command with its own TF_CONFIG task

The rules every worker follows, so that all of them hold the same model at every step:
  * input: replica r of R reads its own shard r of the training split (by file or by element,
    ``tfflows.data.sharding``) in batches of --batch_size / R; a worker with several replicas
    runs one pipeline per replica and hands their batches out in turn. The global batch is the
    concatenation of the replica batches in replica order, the same whether the R replicas sit
    on one machine or on R machines.
  * start: after restoring (or initialising ActNorm) the chief's variables are copied to every
    worker (``broadcast_from_chief``), so the workers start from one state even when only the
    chief can read the workdir or the workers' first batches differ.
  * writes: only the chief writes the workdir; the others write their share of each collective
    checkpoint save to a private temporary directory that is deleted at exit.
  * a lost worker: MultiWorkerMirroredStrategy's coordination service notices a worker that
    stopped sending heartbeats and aborts the collectives of the others, which then stop with
    ``WorkerLostError`` naming the chief's last checkpoint; rerunning every worker with the
    same command resumes from it.
"""

import hashlib
import json
import os
import socket

import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
from tensorflow.python.eager import context

# The modes every worker of a multi-worker run takes part in; the others run on the chief only.
ALL_WORKER_MODES = ('train', 'eval')
# The errors a collective raises when a peer is gone (Unavailable: killed, unreachable, or
# declared dead by the coordination service; FailedPrecondition: the peer restarted) or the
# collectives were aborted or timed out.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.FailedPreconditionError,
                      tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                      tf.errors.AbortedError)


class WorkerLostError(RuntimeError):
  """A peer worker of a multi-worker run died or became unreachable."""


def make_strategy(name, worker_timeout_seconds=10):
  """tf.distribute strategy: default (one device), mirrored (local GPUs, else every logical
  CPU device), multiworker (MultiWorkerMirroredStrategy, cluster from TF_CONFIG; a worker
  without a heartbeat for worker_timeout_seconds is declared lost).

  Made once per process and then reused (the first call's timeout stays):
  MultiWorkerMirroredStrategy configures the process's collectives, and two MirroredStrategy
  objects over the same devices number their collective ops alike, so the second one's
  all-reduces would be taken for the first one's."""
  if name not in _STRATEGIES:
    _STRATEGIES[name] = _new_strategy(name, worker_timeout_seconds)
  return _STRATEGIES[name]


_STRATEGIES = {}


def _new_strategy(name, worker_timeout_seconds):
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'mirrored':
    if tf.config.list_logical_devices('GPU'):
      return tf.distribute.MirroredStrategy()
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices('CPU')])
  if name == 'multiworker':
    _configure_coordination_service(worker_timeout_seconds)
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise ValueError(f'unknown strategy {name!r}')


def _configure_coordination_service(heartbeat_timeout_seconds):
  """The coordination service MultiWorkerMirroredStrategy would configure itself (TF 2.21,
  collective_all_reduce_strategy.py), with our heartbeat timeout: a worker that stops
  sending heartbeats (killed, frozen, cut off) is declared dead after it, and the service
  aborts the collectives of the others, which then raise UnavailableError instead of waiting
  forever. (A killed worker on a reachable host is noticed sooner: its peers' gRPC calls fail
  with 'Connection reset by peer'.)"""
  config = json.loads(os.environ.get('TF_CONFIG') or '{}')
  cluster = config.get('cluster', {})
  jobs = [j for j in ('chief', 'worker') if cluster.get(j)]
  if not jobs or config.get('task', {}).get('type') not in jobs:
    return  # no cluster: the strategy runs a single local worker
  if context.context().coordination_service is not None:
    return
  leader = f'/job:{jobs[0]}/replica:0/task:0'
  context.context().configure_coordination_service(
      service_type='standalone', service_leader=leader,
      heartbeat_timeout_in_ms=int(heartbeat_timeout_seconds * 1000),
      coordinated_jobs=[coordination_config_pb2.CoordinatedJob(name=j, num_tasks=len(cluster[j]))
                        for j in jobs])


def is_chief(strategy):
  """(is_chief, task id): only the chief of a multi-worker cluster writes to the workdir (the
  'chief' task, else worker 0 when the cluster has no chief)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  task_type = getattr(resolver, 'task_type', None)
  if not task_type:
    return True, 0
  task_id = resolver.task_id or 0
  if task_type == 'chief':
    return True, task_id
  has_chief = 'chief' in resolver.cluster_spec().as_dict()
  return task_type == 'worker' and task_id == 0 and not has_chief, task_id


def num_workers(strategy):
  """Worker processes taking part in the strategy's collectives (1 without a cluster)."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not getattr(resolver, 'task_type', None):
    return 1
  spec = resolver.cluster_spec().as_dict()
  return sum(len(spec.get(job, [])) for job in ('chief', 'worker'))


def worker_index(strategy):
  """This worker's index among the num_workers (the chief is 0): its id in the collectives."""
  resolver = getattr(strategy, 'cluster_resolver', None)
  task_type = getattr(resolver, 'task_type', None)
  if not task_type:
    return 0
  task_id = resolver.task_id or 0
  if task_type == 'chief':
    return 0
  return task_id + (1 if 'chief' in resolver.cluster_spec().as_dict() else 0)


def gather_batches(strategy, results, sizes, width):
  """Every worker's per-image results in the order of one stream of batches.

  results: {batch index: float array [size, width]} of the batches this worker computed;
  sizes: the size of every batch of the stream (every worker reads the whole stream). Returns
  the [sum(sizes), width] float64 array of all batches, each computed by exactly one worker
  (one all-reduce; the other workers contribute zeros there)."""
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  mine = np.zeros((offsets[-1], width))
  for i, values in results.items():
    mine[offsets[i]:offsets[i + 1]] = values
  return sum_over_workers(strategy, mine)


def per_replica_dataset(strategy, global_batch, build):
  """The training input: replica r of R reads ``build(global_batch // R, R, r)`` (a dataset of
  that replica's batches of its own shard); a worker's replicas take their pipelines' batches
  in turn. One replica: ``build(global_batch, 1, 0)`` itself."""
  replicas = strategy.num_replicas_in_sync
  if replicas == 1:
    return build(global_batch, 1, 0)

  def worker_input(context):
    local = replicas // context.num_input_pipelines
    first = context.input_pipeline_id * local
    datasets = [build(global_batch // replicas, replicas, first + j) for j in range(local)]
    if local == 1:
      return datasets[0]
    return tf.data.Dataset.choose_from_datasets(datasets, tf.data.Dataset.range(local).repeat())

  return strategy.distribute_datasets_from_function(worker_input)


def broadcast_from_chief(strategy, variables):
  """Copies the chief's values of ``variables`` (created under the strategy) to every worker:
  one all-reduce per dtype, where only replica 0 (the chief's first) contributes its values.
  A no-op with one worker."""
  if num_workers(strategy) == 1 or not variables:
    return
  groups = {}
  for v in variables:
    groups.setdefault(tf.as_dtype(v.dtype), []).append(v)

  @tf.function(autograph=False)
  def chief_values():
    def replica_fn():
      context = tf.distribute.get_replica_context()
      source = tf.equal(context.replica_id_in_sync_group, 0)
      out = []
      for group in groups.values():
        mine = [tf.where(source, tf.convert_to_tensor(v), tf.zeros(v.shape, v.dtype))
                for v in group]
        out.append(context.all_reduce(tf.distribute.ReduceOp.SUM, mine))
      return out
    return strategy.run(replica_fn)

  values = strategy.experimental_local_results(chief_values())[0]
  for group, group_values in zip(groups.values(), values):
    for v, value in zip(group, group_values):
      v.assign(value)


def sum_over_workers(strategy, array):
  """The element-wise sum over the workers of a float64 numpy array (the same shape on every
  worker): each worker's first replica contributes its array, the others zeros."""
  array = np.asarray(array, np.float64)
  if num_workers(strategy) == 1:
    return array
  local = len(strategy.extended.worker_devices)

  @tf.function(autograph=False)
  def reduce():
    def replica_fn():
      context = tf.distribute.get_replica_context()
      first = tf.equal(context.replica_id_in_sync_group % local, 0)
      value = tf.where(first, tf.constant(array), tf.zeros(array.shape, tf.float64))
      return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
    return strategy.run(replica_fn)

  return strategy.experimental_local_results(reduce())[0].numpy()


def digest(variables):
  """SHA-256 (hex) of the bytes of the variables' values, in order."""
  h = hashlib.sha256()
  for v in variables:
    h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
  return h.hexdigest()


def workers_agree(strategy, variables):
  """(agree, digest): whether every worker holds bit-identical values of ``variables``, by
  comparing the first 8 bytes of each worker's digest (one all-reduce of min and max)."""
  mine = digest(variables)
  if num_workers(strategy) == 1:
    return True, mine
  key = float(int(mine[:12], 16))  # 48 bits: exact in float64
  keys = sum_over_workers(strategy, np.eye(num_workers(strategy))[worker_index(strategy)] * key)
  return bool(np.all(keys == keys[0])), mine


def worker_lost_message(error, last_checkpoint):
  """The one-paragraph explanation of a run stopped by a lost worker."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  telling = [line for line in lines if not line.startswith(
      ('Graph execution error', 'Detected at node', 'File ', 'Additional GRPC', '[[', '{{',
       ':UNKNOWN'))]
  cause = (telling or lines or [''])[0][:300]
  resume = (f"The chief's last checkpoint is {last_checkpoint}." if last_checkpoint
            else 'No checkpoint was written yet.')
  return (f'a worker of the multi-worker run was lost ({type(error).__name__}: {cause}); '
          f'training stopped on this worker. {resume} Restart every worker with the same '
          'command and its own TF_CONFIG to resume from the latest checkpoint.')


def log_cluster(strategy):
  chief, task_id = is_chief(strategy)
  logging.info('%d worker(s), %d replica(s) in sync; this is task %d (%s)',
               num_workers(strategy), strategy.num_replicas_in_sync, task_id,
               'chief' if chief else 'not the chief: writes nothing to the workdir')


def free_local_ports(n):
  """``n`` TCP ports on 127.0.0.1 that were free a moment ago (for a local TF_CONFIG cluster)."""
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports
