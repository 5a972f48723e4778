"""--mode=train: Keras Model.fit with the model's own train_step, resumable from the workdir.

Start-up, in order:
  1. build the model, optimizer and checkpoint under the distribution strategy's scope;
  2. restore the newest checkpoint of WORKDIR/checkpoints if there is one (weights, ActNorm's
     initialised flags, optimizer moments and iterations, step, SeedGenerator state);
     otherwise load the weights of --init_from (fine-tuning: fresh optimizer and schedule);
     otherwise (a fresh run) initialise ActNorm on one real training batch;
  3. fit from the restored step t0: epoch e0 = t0 // S resumes at its step t0 % S (a first
     fit of the remaining S - t0 % S steps), then whole epochs up to --epochs.
The schedule and the checkpoints key on the optimizer's iteration count, so a resumed run is at
the same step, learning rate and optimizer state as the run that wrote the checkpoint.
"""

import time

import keras
import tensorflow as tf
from absl import logging

import tfflows
from tfflows import optimizers
from train import callbacks as train_callbacks
from train import checkpoints
from train import schedule as lr_schedule
from train.run import UserError, say


def make_strategy(name):
  """tf.distribute strategy: default (one device), mirrored (local GPUs, else every logical
  CPU device), multiworker (MultiWorkerMirroredStrategy, cluster from TF_CONFIG)."""
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'mirrored':
    if tf.config.list_logical_devices('GPU'):
      return tf.distribute.MirroredStrategy()
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices('CPU')])
  if name == 'multiworker':
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise ValueError(f'unknown strategy {name!r}')


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


def make_optimizer(name, learning_rate, mixed_precision=False):
  """Adamax or Adam (Keras defaults; one fused kernel per variable, ``tfflows.optimizers``) at a
  learning-rate schedule; a LossScaleOptimizer around it under mixed precision."""
  optimizer = {'adamax': optimizers.FusedAdamax, 'adam': optimizers.FusedAdam}[name](
      learning_rate=learning_rate)
  return keras.optimizers.LossScaleOptimizer(optimizer) if mixed_precision else optimizer


def build_training_model(run, schedule):
  """The compiled FlowModel with a built optimizer (call under the strategy's scope)."""
  f = run.flags
  if f.mixed_precision:
    keras.mixed_precision.set_global_policy('mixed_float16')
  model = tfflows.build_model(run.config)
  model.max_grad_norm = f.max_grad_norm
  model.scale_l2 = f.scale_l2
  optimizer = make_optimizer(f.optimizer, schedule, f.mixed_precision)
  model.compile(optimizer, jit_compile=run.jit_compile)
  optimizer.build(model.trainable_variables)
  return model


def check_mixed_precision(model, images):
  """Runs one forward pass in float16; UserError with the reason if the model cannot."""
  try:
    log_w = model(tf.cast(images, tf.float32), training=False)
  except (TypeError, ValueError, tf.errors.InvalidArgumentError) as error:
    raise UserError(f'--mixed_precision: model {model.config.model} cannot run in float16 '
                    f'({str(error).splitlines()[0][:300]}). Drop --mixed_precision.') from None
  if log_w.dtype != tf.float32:
    raise UserError(f'--mixed_precision: model {model.config.model} returns log-likelihoods in '
                    f'{log_w.dtype.name}, not float32. Drop --mixed_precision.')


def initialise(run, model, checkpointer, first_batch):
  """Restores the workdir's latest checkpoint, else --init_from's weights, else initialises
  ActNorm on a real batch (first_batch(): one training batch, read only then). Returns a
  description for the log."""
  resumed = checkpointer.restore_latest()
  if resumed:
    return f'resumed from {resumed}'
  if run.flags.init_from:
    prefix = checkpoints.find_checkpoint(run.flags.init_from)
    checkpoints.restore_model(model, prefix)
    return f'fine-tuning from the weights of {prefix} (fresh optimizer)'
  # ActNorm's data-dependent initialisation, in cross-replica context on one global batch, so
  # every replica starts from the same statistics.
  model(tf.cast(first_batch(), tf.float32), training=True)
  return 'fresh run (ActNorm initialised on one training batch)'


def run_train(run):
  """Trains to --epochs; returns a summary dict (also logged)."""
  f = run.flags
  started = time.perf_counter()
  strategy = make_strategy(f.strategy)
  replicas = strategy.num_replicas_in_sync
  if f.batch_size % replicas:
    raise UserError(f'--batch_size={f.batch_size} is not divisible by the {replicas} replicas '
                    f'of --strategy={f.strategy}.')
  chief, worker_id = is_chief(strategy)
  train_ds = run.train_dataset(seed=f.seed)  # fails early (nothing written) if data is missing
  if chief:
    run.write_workdir_config()
  steps_per_epoch = run.steps_per_epoch
  schedule = lr_schedule.WarmupExponentialDecay(f.learning_rate, f.warmup_steps, f.lr_decay,
                                                steps_per_epoch)

  def first_batch():
    return next(iter(train_ds))

  with strategy.scope():
    model = build_training_model(run, schedule)
    if f.mixed_precision:
      check_mixed_precision(model, first_batch())
    checkpointer = checkpoints.Checkpointer(run.workdir, model, model.optimizer,
                                            f.keep_checkpoints, chief, worker_id)
    how = initialise(run, model, checkpointer, first_batch)
  start = int(model.optimizer.iterations.numpy())
  total = f.epochs * steps_per_epoch
  logging.info('%s; step %d of %d (%d epochs of %d steps), %d replica(s), jit_compile=%s',
               how, start, total, f.epochs, steps_per_epoch, replicas, run.jit_compile)
  summaries = train_callbacks.TensorBoardSummaries(
      run.path('tensorboard'), schedule, f.batch_size, f.log_every_steps, f.num_samples,
      run.temperatures, f.seed, write=chief)
  callback_list = [train_callbacks.NonFiniteGuard(f.on_nonfinite),
                   train_callbacks.TrainingProgress(f.epochs, total, f.batch_size, schedule,
                                                    f.scale_l2 > 0, f.verbose),
                   train_callbacks.BatchNormRefresh(run.train_dataset(seed=f.seed + 1),
                                                    f.bn_refresh_batches, seed=f.seed),
                   summaries,
                   train_callbacks.CheckpointCallback(checkpointer, f.checkpoint_every_steps,
                                                      steps_per_epoch)]
  if start < total:
    # A resumed deterministic run reads a different (but seeded) order than an uninterrupted
    # one: the data seed moves with the start step rather than replaying consumed batches.
    train_ds = run.train_dataset(seed=f.seed + start)
    fit_from(model, start, total, steps_per_epoch, train_ds, run.test_dataset(),
             callback_list, verbose=0)  # TrainingProgress replaces Keras' progress bar
  else:
    logging.info('nothing to train: step %d already reaches --epochs=%d x %d steps', start,
                 f.epochs, steps_per_epoch)
  step = int(model.optimizer.iterations.numpy())
  checkpointer.save(step, step // steps_per_epoch)  # the final state (a no-op if just saved)
  checkpointer.close()
  return _report(summaries, step, start, time.perf_counter() - started)


def fit_from(model, start, total, steps_per_epoch, train_ds, test_ds, callback_list, verbose):
  """model.fit from step `start` to `total`: the rest of a partial epoch, then whole epochs."""
  epoch, offset = divmod(start, steps_per_epoch)
  epochs = total // steps_per_epoch
  common = dict(validation_data=test_ds, callbacks=callback_list, verbose=verbose,
                shuffle=False)  # the dataset shuffles
  if offset:
    model.fit(train_ds, initial_epoch=epoch, epochs=epoch + 1,
              steps_per_epoch=steps_per_epoch - offset, **common)
    epoch += 1
  if epoch < epochs:
    model.fit(train_ds, initial_epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch,
              **common)


def _report(summaries, step, start, seconds):
  logs = dict(summaries.last_logs)
  rates = summaries.epoch_throughput
  logs.update(step=step, steps_this_run=step - start, wall_seconds=round(seconds, 1),
              images_per_second=(sum(rates) / len(rates)) if rates else float('nan'))
  say('train done: step %d (%d this run) in %.0f s; train %.4f, test %.4f bits/dim; '
      '%.1f images/s', step, step - start, seconds, logs.get('train_bits_per_dim', float('nan')),
      logs.get('test_bits_per_dim', float('nan')), logs['images_per_second'])
  return logs
