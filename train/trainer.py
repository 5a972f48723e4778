"""--mode=train: Keras Model.fit with the model's own train_step, resumable from the workdir.

Start-up, in order (nothing is written to the workdir before step 4, so a failed start leaves
nothing behind):
  1. build the model, optimizer and checkpoint under the distribution strategy's scope (the
     checkpointer refuses a checkpoints/ directory without a usable state file, and a disk
     without room for a checkpoint);
  2. restore the newest checkpoint of WORKDIR/checkpoints if there is one (weights, ActNorm's
     initialised flags, optimizer moments and iterations, step, SeedGenerator state);
     otherwise load the weights of --init_from (fine-tuning: fresh optimizer and schedule);
     otherwise (a fresh run) initialise ActNorm on one real training batch; with several
     workers the chief's state is then copied to every worker (train/distributed.py);
  3. check that this model gives a finite log-likelihood of the probe images (test images, the
     same ones every checkpoint is checked on);
  4. write config.json and flags.txt (atomically; train/checkpoints.py has the workdir's
     rules);
  5. fit from the restored step t0: epoch e0 = t0 // S resumes at its step t0 % S (a first
     fit of the remaining S - t0 % S steps), then whole epochs up to --epochs.
The schedule and the checkpoints key on the optimizer's iteration count, so a resumed run is at
the same step, learning rate and optimizer state as the run that wrote the checkpoint. Under
--strategy=mirrored|multiworker replica r reads shard r of the training split, each replica's
forward and backward pass is one XLA program (with --jit_compile), and a lost worker stops the
others with a message naming the chief's last checkpoint.
"""

import time

import tensorflow as tf
from absl import logging

from bijectors import repeated
from tfflows import optimizers
from tfflows.nn import precision
from train import callbacks as train_callbacks
from train import checkpoint_contents
from train import checkpoint_files
from train import checkpoints
from train import distributed
from train import model_vetting
from train import schedule as lr_schedule
from train.run import UserError, say


def make_optimizer(name, learning_rate):
  """Adamax or Adam (Keras defaults; one fused kernel per variable, ``tfflows.optimizers``) at a
  learning-rate schedule. No loss scaling, also for float16 networks: FlowModel's train step
  takes the gradients of the unscaled float32 loss, which a keras LossScaleOptimizer would
  divide by its scale (2^15) before applying them."""
  return {'adamax': optimizers.FusedAdamax, 'adam': optimizers.FusedAdam}[name](
      learning_rate=learning_rate)


def build_training_model(run, schedule):
  """The compiled FlowModel with a built optimizer (call under the strategy's scope).

  With jit_compile on, one device has Keras compile the whole step with XLA; under a
  strategy each replica's forward and backward pass is one XLA program and the all-reduce and
  the optimizer update run outside it (``FlowModel.compile``, tfflows.models.replica_step)."""
  f = run.flags
  # --mixed_precision is Keras' 'mixed_float16' policy, set while the model is built: build_model
  # creates the networks under it and everything else in float32, the model that
  # --conditioner_precision=float16 gives (tfflows.nn.precision).
  if f.mixed_precision and run.config.conditioner_precision not in ('auto', 'float16'):
    raise UserError(f'--mixed_precision computes the networks in float16, which '
                    f'--conditioner_precision={run.config.conditioner_precision} contradicts: '
                    'drop one of them.')
  with precision.dtype_policy_scope('mixed_float16' if f.mixed_precision else None):
    model = run.build_model()
  optimizer = make_optimizer(f.optimizer, schedule)
  model.compile(optimizer, max_grad_norm=f.max_grad_norm, scale_l2=f.scale_l2,
                jit_compile=bool(run.jit_compile))
  optimizer.build(model.trainable_variables)
  _warn_of_xla_loops_on_cpu(model, run.jit_compile)
  return model


def _warn_of_xla_loops_on_cpu(model, jit_compile):
  """XLA on a CPU runs the gradients of convolutions inside a while loop far slower than at
  the top level (measured: DF-74-10 at batch 4, 0.09 images/s with the steps as loops against
  1.98 unrolled, and 1.67 with loops without XLA), so say so when that is what will run."""
  if (jit_compile and not tf.config.list_logical_devices('GPU')
      and repeated.has_while_loops(model)):
    logging.warning('XLA (--jit_compile) on a CPU runs the gradients of the repeated flow '
                    'steps, which run as loops, about 20x slower than TensorFlow\'s own '
                    'kernels; on a CPU train with --nojit_compile.')


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
  ActNorm on a real batch (first_batch(): one training batch, read only then). Returns (a
  description for the log, the checkpoint of WORKDIR/checkpoints resumed from or None)."""
  resumed = checkpointer.restore_latest()
  if resumed:
    return f'resumed from {resumed}', resumed
  if run.flags.init_from:
    prefix = checkpoint_files.find_checkpoint(run.flags.init_from)
    try:
      checkpoint_contents.restore_model(model, prefix)
    except checkpoint_files.CheckpointError as error:
      note = checkpoints.config_difference_note(run.flags.init_from, run.config)
      raise UserError(f'--init_from={run.flags.init_from}: {error}{note}') from None
    return f'fine-tuning from the weights of {prefix} (fresh optimizer)', None
  # ActNorm's data-dependent initialisation, in cross-replica context on one global batch, so
  # every replica starts from the same statistics (across workers: the chief's, broadcast).
  unscaled = model.initialize(first_batch())
  note = f'; {unscaled} channel(s) only centred (uniform batch)' if unscaled else ''
  return f'fresh run (ActNorm initialised on one training batch{note})', None


def probe_images(run, replicas):
  """The images every checkpoint's model is checked on: the first test images, as many as one
  replica's batch (the same on every worker: the test split is read in a fixed order)."""
  return run.images('test', max(1, min(run.eval_batch_size, run.flags.batch_size) // replicas))


def synchronise_workers(strategy, model, checkpointer):
  """Gives every worker the chief's restored or initialised state (weights, ActNorm flags,
  optimizer moments and iterations, SeedGenerator states, step counters)."""
  if distributed.num_workers(strategy) == 1:
    return
  distributed.broadcast_from_chief(
      strategy, list(model.variables) + list(model.optimizer.variables)
      + [checkpointer.step, checkpointer.epoch])
  step = int(checkpointer.step.numpy())
  if step:  # the chief resumed from ckpt-<step>: no worker saves that step again
    checkpointer.last_saved_step = step


def run_train(run):
  """Trains to --epochs; returns a summary dict (also logged)."""
  f = run.flags
  started = time.perf_counter()
  strategy = run.strategy
  replicas = strategy.num_replicas_in_sync
  if f.batch_size % replicas:
    raise UserError(f'--batch_size={f.batch_size} is not divisible by the {replicas} replicas '
                    f'of --strategy={f.strategy}.')
  chief, worker_id = distributed.is_chief(strategy)
  workers = distributed.num_workers(strategy)
  if workers > 1:
    distributed.log_cluster(strategy)
  # The training split in global batches at the run's seed, made first so that missing data
  # stops the run before anything is built or written: ActNorm's first batch of a fresh run
  # (one global batch in cross-replica context, so every replica starts from the same
  # statistics) and the batches BatchNormRefresh reads (global batches, cross-replica, each
  # refresh from the start of the stream: it must not take batches from the training input).
  # The training input itself (below) is per replica and starts at seed + the start step.
  global_batches = run.train_dataset(seed=f.seed)
  steps_per_epoch = run.steps_per_epoch
  schedule = lr_schedule.WarmupExponentialDecay(f.learning_rate, f.warmup_steps, f.lr_decay,
                                                steps_per_epoch)

  def first_batch():
    return next(iter(global_batches))

  with strategy.scope():
    model = build_training_model(run, schedule)
    if f.mixed_precision:
      check_mixed_precision(model, first_batch())
    checkpointer = checkpoints.Checkpointer(run.workdir, model, model.optimizer,
                                            f.keep_checkpoints, chief, worker_id,
                                            probe_images=probe_images(run, replicas))
  try:
    with strategy.scope():
      how, restored = initialise(run, model, checkpointer, first_batch)
      synchronise_workers(strategy, model, checkpointer)
    checkpointer.check_start(how, restored)
    if chief:
      checkpoints.write_config(run.workdir, run.config, f)
    start = int(model.optimizer.iterations.numpy())
    total = f.epochs * steps_per_epoch
    logging.info('%s; step %d of %d (%d epochs of %d steps), %d replica(s), jit_compile=%s%s',
                 how, start, total, f.epochs, steps_per_epoch, replicas, run.jit_compile,
                 ' (per replica)' if model.replica_jit_compile else '')
    summaries = train_callbacks.TensorBoardSummaries(
        run.path('tensorboard'), schedule, f.batch_size, f.log_every_steps, f.num_samples,
        run.temperatures, f.seed, write=chief)
    # The checkpoint callback before the summaries: a model that gives NaN stops training with
    # the checkpointer's message (naming the last good checkpoint) before anything samples it.
    # TrainingProgress replaces Keras' progress bar; BatchNormRefresh recomputes batch-norm
    # statistics before each per-epoch test evaluation (--bn_refresh_batches).
    callback_list = [model_vetting.NonFiniteGuard(f.on_nonfinite, f.max_nonfinite_skips,
                                                  last_good=lambda: checkpointer.last_good),
                     train_callbacks.TrainingProgress(f.epochs, total, f.batch_size, schedule,
                                                      f.scale_l2 > 0, f.verbose),
                     train_callbacks.BatchNormRefresh(global_batches, f.bn_refresh_batches,
                                                      seed=f.seed),
                     train_callbacks.CheckpointCallback(checkpointer, f.checkpoint_every_steps,
                                                        steps_per_epoch),
                     summaries]
    if start < total:
      # A resumed deterministic run reads a different (but seeded) order than an uninterrupted
      # one: the data seed moves with the start step rather than replaying consumed batches
      # (a fresh run on one replica reads the stream of global_batches, whose first batch
      # initialised ActNorm). Replica r of R reads shard r of the split (train/distributed.py).
      train_ds = distributed.per_replica_dataset(
          strategy, f.batch_size,
          lambda batch, shards, index: run.train_dataset(seed=f.seed + start, batch_size=batch,
                                                         num_shards=shards, shard_index=index))
      fit_from(model, start, total, steps_per_epoch, train_ds, run.test_dataset(),
               callback_list, verbose=0)
    step = int(model.optimizer.iterations.numpy())
    checkpointer.save(step, step // steps_per_epoch)  # the final state (a no-op if just saved)
    if workers > 1:
      check_workers_agree(strategy, model)
  except distributed.LOST_WORKER_ERRORS as error:
    if workers == 1:
      raise
    raise UserError(distributed.worker_lost_message(
        error, checkpoint_files.resolve(run.workdir, 'latest'))) from None
  finally:
    checkpointer.close()
  return _report(summaries, step, start, total, time.perf_counter() - started)


def check_workers_agree(strategy, model):
  """Every worker must end with bit-identical weights and optimizer state; UserError if not."""
  agree, digest = distributed.workers_agree(
      strategy, list(model.variables) + list(model.optimizer.variables))
  if not agree:
    raise UserError('the workers ended with different weights (a bug: report it with the logs '
                    f'of every worker); this worker\'s sha256 is {digest}.')
  logging.info('all %d workers hold identical weights and optimizer state (sha256 %s)',
               distributed.num_workers(strategy), digest)


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


def _report(summaries, step, start, total, seconds):
  logs = dict(summaries.last_logs)
  rates = summaries.epoch_throughput
  logs.update(step=step, steps_this_run=step - start, wall_seconds=round(seconds, 1),
              images_per_second=(sum(rates) / len(rates)) if rates else float('nan'))
  if start >= total:  # nothing to run: no figures of this run to report
    say('train done: nothing to train, the workdir\'s checkpoint is at step %d of %d; pass a '
        'larger --epochs to train on (--mode=eval scores the checkpoint)', step, total)
    return logs
  say('train done: step %d (%d this run) in %.0f s; train %.4f, test %.4f bits/dim; '
      '%.1f images/s', step, step - start, seconds, logs.get('train_bits_per_dim', float('nan')),
      logs.get('test_bits_per_dim', float('nan')), logs['images_per_second'])
  return logs
