"""The training step of a FlowModel on several replicas (tf.distribute), and on one.

``FlowModel.train_step`` runs in each replica's context (Keras calls it inside
``strategy.run``) as

    1. forward and backward on the replica's b images     ``loss_and_gradients``
       (one XLA program per replica when ``model.replica_jit_compile``, which
       ``FlowModel.compile(..., jit_compile=True)`` under a strategy sets);
    2. one all-reduce: the mean over the R replicas of the gradients, bits/dim and loss
                                                           ``mean_over_replicas``;
    3. clipping by the global norm and the NaN guard on the reduced gradients, then the
       optimizer update, which must not all-reduce again  ``apply_reduced_gradients``.

With equal replica batches the mean of the R replica means is the mean over the global batch
of R b images, and the replicas draw their dequantization and augmentation noise as rows of
the global batch's draw (``tfflows.random.replica_rows``), so the step computes the
single-device step on the global batch up to the order of float sums. What stays per replica:
the statistics of BatchNormalization layers in training (DenseFlow's and RealNVP's coupling
networks normalise by the replica's b images, not the global batch; their moving averages are
updated by each replica from its own batch), and Keras Dropout masks (mAR-SCF's MixLogCDF
conditioner; each replica's SeedGenerator gives the same mask pattern). ActNorm's
data-dependent initialisation must happen before the first distributed step, on one global
batch (train/trainer.py does), else each replica would initialise on its own images.

Why step 3 needs care: Keras' TensorFlow optimizers sum the gradients over replicas inside
``apply_gradients``; clipping and the finiteness check must see the global gradient, so the
model reduces first and the optimizer's own reduction is switched off for its update.
"""

import tensorflow as tf

from tfflows import random


def replica_position():
  """(replica id, number of replicas) of the current replica context; (0, 1) outside any
  strategy and in cross-replica context (one computation on the whole batch). Both are Python
  ints (the id is a constant per replica when tracing)."""
  context = tf.distribute.get_replica_context()
  if context is None:  # cross-replica context
    return 0, 1
  replicas = context.num_replicas_in_sync
  if replicas == 1:
    return 0, 1
  replica = tf.get_static_value(context.replica_id_in_sync_group)
  if replica is None:
    raise ValueError('the replica id is not a constant in this replica context: cannot place '
                     "this replica's noise in the global batch.")
  return int(replica), replicas


def loss_and_gradients(model, images):
  """(bits/dim, loss, gradients) of the replica's float images [b, H, W, C], from
  ``model.loss_and_gradients``; XLA-compiled per replica when ``model.replica_jit_compile``
  (one program per (replica, image shape); the replica's variables are its own copies)."""
  replica, replicas = replica_position()
  if not model.replica_jit_compile:
    with random.replica_rows(replica, replicas):
      return model.loss_and_gradients(images)
  compiled = model.__dict__.get('_replica_step_compiled')
  if compiled is None:
    def step(x, replica, replicas):
      with random.replica_rows(replica, replicas):
        return model.loss_and_gradients(x)
    compiled = tf.function(step, jit_compile=True, reduce_retracing=True)
    model.__dict__['_replica_step_compiled'] = compiled  # not a Keras-tracked attribute
  return compiled(images, replica, replicas)


def mean_over_replicas(values):
  """The mean over the replicas in sync of a list of tensors (one all-reduce); the values
  themselves on one replica."""
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return values
  return context.all_reduce(tf.distribute.ReduceOp.MEAN, values)


def apply_reduced_gradients(optimizer, grads_and_vars):
  """optimizer.apply_gradients for gradients already reduced over the replicas.

  Keras' TFOptimizer sums the gradients over the replicas in ``_all_reduce_sum_gradients``
  (keras/src/backend/tensorflow/optimizer.py, called in replica context before its merge_call);
  that method is replaced by the identity on the optimizer instance while this update is
  traced. (MirroredStrategy traces replicas in turn in their own threads, and every replica
  passes that call before any leaves its merge_call, so the replacement is removed only after
  the last replica used it.)"""
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return optimizer.apply_gradients(grads_and_vars)
  targets = [o for o in (optimizer, getattr(optimizer, 'inner_optimizer', None))
             if o is not None and hasattr(o, '_all_reduce_sum_gradients')]
  if not targets:
    raise TypeError(f'{type(optimizer).__name__} is not a Keras TensorFlow optimizer: cannot '
                    'apply gradients reduced over replicas without reducing them again.')
  for target in targets:
    target.__dict__['_all_reduce_sum_gradients'] = _already_reduced
  try:
    return optimizer.apply_gradients(grads_and_vars)
  finally:
    for target in targets:
      target.__dict__.pop('_all_reduce_sum_gradients', None)


def _already_reduced(grads_and_vars):
  return list(grads_and_vars)


def keras_logs(logs):
  """The logs a train or test step returns to Keras. Keras 3's TensorFlow trainer reduces
  each log of a multi-worker step with ``strategy.reduce('MEAN', value, axis=0)``
  (``reduce_per_replica``), which fails for scalars ("Invalid reduction dimension 0 for input
  with 0 dimensions", tensorflow/tensorflow#72388); as vectors of one element they reduce to
  the scalar mean over the replicas. Elsewhere the logs stay scalars."""
  strategy = tf.distribute.get_strategy()
  multi_worker = (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                  and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access
  return {k: tf.reshape(v, [1]) for k, v in logs.items()} if multi_worker else logs
