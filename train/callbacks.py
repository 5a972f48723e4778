"""Keras callbacks of the training program: checkpoints, TensorBoard summaries, batch-norm
refresh before each test evaluation, and the training progress display (the NaN guard is
``train.model_vetting.NonFiniteGuard``, with the rest of the non-finite policy).
"""

import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfflows import sampling
from tfflows.models.flow_model import NonFiniteError
from train import progress as progress_lib


def _value(logs, key, default=float('nan')):
  value = (logs or {}).get(key)
  return default if value is None else float(np.asarray(value))


def _step(model):
  return int(model.optimizer.iterations.numpy())


class CheckpointCallback(keras.callbacks.Callback):
  """Saves every `every_steps` steps (0: never mid-epoch) and at every epoch end; after an
  epoch with a test bits/dim, also to best/ when it is the best so far."""

  def __init__(self, checkpointer, every_steps, steps_per_epoch):
    super().__init__()
    self.checkpointer = checkpointer
    self.every_steps = every_steps
    self.steps_per_epoch = steps_per_epoch

  def on_train_batch_end(self, batch, logs=None):
    step = _step(self.model)
    if self.every_steps and step % self.every_steps == 0:
      self._save(step)

  def on_epoch_end(self, epoch, logs=None):
    step = _step(self.model)
    self._save(step)
    test_bpd = _value(logs, 'val_bpd')
    if np.isfinite(test_bpd) and self.checkpointer.save_best(step, step // self.steps_per_epoch,
                                                             test_bpd):
      logging.info('best test bits/dim so far (%.4f): saved to best/', test_bpd)

  def _save(self, step):
    prefix = self.checkpointer.save(step, step // self.steps_per_epoch)
    if prefix:
      logging.info('saved %s', prefix)


class TensorBoardSummaries(keras.callbacks.Callback):
  """TensorBoard scalars and sample grids, and throughput.

  Every `every_steps` steps (tensorboard/train): bits_per_dim (the epoch's running mean),
  loss, grad_norm (running mean), learning_rate, images_per_second. Every epoch end:
  bits_per_dim in tensorboard/train and tensorboard/test (same tag, so they overlay),
  images_per_second over the epoch, and an image grid of `num_samples` samples at each
  temperature (fixed seed, so epochs are comparable). Throughput leaves out the first step of
  every epoch (in the first epoch: tracing and XLA compilation)."""

  def __init__(self, logdir, learning_rate, global_batch_size, every_steps, num_samples,
               temperatures, seed, write=True):
    super().__init__()
    self.learning_rate = learning_rate
    self.global_batch_size = global_batch_size
    self.every_steps = every_steps
    self.num_samples = num_samples
    self.temperatures = list(temperatures)
    self.seed = seed
    self.write = write
    self.train_writer = tf.summary.create_file_writer(f'{logdir}/train') if write else None
    self.test_writer = tf.summary.create_file_writer(f'{logdir}/test') if write else None
    self.epoch_throughput = []
    self.last_logs = {}
    self._mark = None  # (time, step) of the last throughput measurement
    self._epoch_mark = None
    self._last_batch = None

  def on_epoch_begin(self, epoch, logs=None):
    self._mark = self._epoch_mark = None  # leaves out the validation and sampling time too

  def on_train_batch_end(self, batch, logs=None):
    step, now = _step(self.model), time.perf_counter()
    self._last_batch = (now, step)
    if self._epoch_mark is None:
      self._mark = self._epoch_mark = (now, step)
      return
    if step % self.every_steps:
      return
    images_per_second = self._rate(self._mark, now, step)
    self._mark = (now, step)
    if self.write:
      with self.train_writer.as_default(step=step):
        tf.summary.scalar('bits_per_dim', _value(logs, 'bpd'))
        tf.summary.scalar('loss', _value(logs, 'loss'))
        tf.summary.scalar('grad_norm', _value(logs, 'grad_norm'))
        tf.summary.scalar('learning_rate', float(self.learning_rate(step - 1)))
        tf.summary.scalar('images_per_second', images_per_second)

  def _rate(self, mark, now, step):
    then, start = mark
    return (step - start) * self.global_batch_size / max(now - then, 1e-9)

  def on_epoch_end(self, epoch, logs=None):
    step = _step(self.model)
    rate = float('nan')
    if self._epoch_mark is not None and self._last_batch[1] > self._epoch_mark[1]:
      rate = self._rate(self._epoch_mark, *self._last_batch)  # validation time left out
      self.epoch_throughput.append(rate)
    train_bpd, test_bpd = _value(logs, 'bpd'), _value(logs, 'val_bpd')
    self.last_logs = {'step': step, 'epoch': epoch + 1, 'train_bits_per_dim': train_bpd,
                      'test_bits_per_dim': test_bpd, 'images_per_second': rate}
    logging.info('epoch %d, step %d: train %.4f bits/dim, test %.4f bits/dim, %.1f images/s, '
                 'lr %.3g, mean gradient norm %.3g', epoch + 1, step, train_bpd, test_bpd, rate,
                 float(self.learning_rate(max(step - 1, 0))), _value(logs, 'grad_norm'))
    if not self.write:
      return
    with self.train_writer.as_default(step=step):
      tf.summary.scalar('bits_per_dim', train_bpd)
      if np.isfinite(rate):
        tf.summary.scalar('images_per_second_epoch', rate)
      for t in self.temperatures:
        try:
          images = self.model.sample(self.num_samples, temperature=t, seed=self.seed).numpy()
        except NonFiniteError as error:   # no black grid in its place
          logging.warning('no sample grid at temperature %g: %s', t, error)
          continue
        tf.summary.image(f'samples/temperature_{t:g}', sampling.image_grid(images)[None],
                         step=step)
    if np.isfinite(test_bpd):
      with self.test_writer.as_default(step=step):
        tf.summary.scalar('bits_per_dim', test_bpd)
    self.train_writer.flush()
    self.test_writer.flush()


# ---------------------------------------------------------------------- batch-norm refresh
def batch_norm_statistics(model):
  """[(layer, moving mean, moving variance)] for the keras.layers.BatchNormalization layers of
  a model, each once. For flow steps that run as a loop (``bijectors.repeated``) the layer is
  the loop's template layer and the statistics are its stacked weights [K, C] (one row a
  step), which hold the model's numbers."""
  found = {}
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      found[id(layer)] = (layer, layer.moving_mean, layer.moving_variance)
    for template in getattr(layer, 'template_layers', ()):   # StackedWeights
      for sub in template._flatten_layers(include_self=True):  # pylint: disable=protected-access
        if isinstance(sub, keras.layers.BatchNormalization):
          found[id(sub)] = (sub, layer.stacked(sub.moving_mean),
                            layer.stacked(sub.moving_variance))
  return list(found.values())


class BatchNormRefresh(keras.callbacks.Callback):
  """Recomputes the running statistics of every batch-norm layer on `num_batches` training
  batches before each test evaluation (Keras' on_test_begin, which fit calls before its
  per-epoch validation).

  Why: evaluation normalises with the running statistics, an exponential average of batch
  statistics over the last updates (DenseFlow's momentum 0.9: about 10 steps). Early in
  training the networks change fast, those statistics describe networks of several updates
  ago, and the evaluated flow is a different flow from the one trained: the quick start's
  first-epoch test figure was 36-85 bits/dim against 6.4 in training. Recomputing them with
  the current weights ("precise BN", Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021)
  removes the lag: each layer's moving mean and variance become the average of its batch
  mean and (biased) batch variance over the refresh batches, the quantities the running
  averages estimate.

  The forward passes run in training mode (batch statistics, as in training) with a fixed
  stateless noise seed, so trainable weights, the optimizer and the model's random state are
  untouched; only the moving statistics change, and they are saved with the epoch's
  checkpoint, so eval, samples and export use them too. Models without batch norm (Glow,
  mAR-SCF) are left alone at no cost.
  """

  def __init__(self, dataset, num_batches, seed=0):
    super().__init__()
    self.dataset = dataset
    self.num_batches = num_batches
    self.seed = seed
    self.refreshes = 0
    self._forward = None

  def on_test_begin(self, logs=None):
    if self.num_batches > 0:
      if refresh_batch_norm(self.model, self.dataset.take(self.num_batches), self.seed,
                            self._forward_fn()):
        self.refreshes += 1

  def _forward_fn(self):
    if self._forward is None:
      model = self.model
      self._forward = tf.function(
          lambda images, seed: model(images, training=True, seed=seed))
    return self._forward


def refresh_batch_norm(model, batches, seed=0, forward=None):
  """Sets every batch-norm layer's moving mean and variance to the average of its batch
  statistics over `batches` (uint8 image batches), from training-mode forward passes with
  the stateless seed (seed + i, 0) for batch i. Returns the number of batches used (0: no batch norm or no
  batches; nothing changes then). `forward(images, seed)`: a cached traced forward pass."""
  statistics = batch_norm_statistics(model)
  if not statistics:
    return 0
  if forward is None:
    forward = lambda images, s: model(tf.cast(images, tf.float32), training=True, seed=s)  # noqa: E731
  layers = [layer for layer, _, _ in statistics]
  momenta = [layer.momentum for layer in layers]
  totals = [[0., 0.] for _ in layers]
  count = 0
  saved = [(mean.numpy(), variance.numpy()) for _, mean, variance in statistics]
  try:
    for layer in layers:
      layer.momentum = 0.  # each pass leaves exactly its batch statistics (also when traced)
    for i, images in enumerate(batches):
      forward(images, tf.constant([seed + i, 0], tf.int32))
      for total, (_, mean, variance) in zip(totals, statistics):
        total[0] = total[0] + mean.numpy()
        total[1] = total[1] + variance.numpy()
      count += 1
  finally:
    for layer, momentum in zip(layers, momenta):
      layer.momentum = momentum
  for (_, mean, variance), old, total in zip(statistics, saved, totals):
    mean.assign(total[0] / count if count else old[0])
    variance.assign(total[1] / count if count else old[1])
  return count


# --------------------------------------------------------------------------------- progress
class TrainingProgress(keras.callbacks.Callback):
  """The training display (in place of Keras' progress bar, which redraws into log files).

  On a terminal, a bar per epoch:

      epoch 3/8  [#########...............]  52/140 steps  131 images/s  bpd 2.412
      grad_norm 35.1  lr 0.001  step 332/1120  ETA 0:21

  bpd: the epoch's running mean of the training bits/dim (the one-sample bound, as the
  optimiser sees it); grad_norm: the running mean of the global gradient norm before any
  clipping; lr: the learning rate of the last step; loss (only with --scale_l2 > 0): bits/dim
  plus the L2 penalty. Elsewhere (a log file, a pipe) nothing is redrawn: a line at most
  every `log_seconds` within long epochs, and the epoch line that TensorBoardSummaries logs.
  """

  def __init__(self, epochs, total_steps, global_batch_size, learning_rate, show_loss=False,
               verbose=1, log_seconds=300.):
    super().__init__()
    self.epochs = epochs
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.learning_rate = learning_rate
    self.show_loss = show_loss
    self.verbose = verbose
    self.log_seconds = log_seconds
    self.progress = None

  def on_epoch_begin(self, epoch, logs=None):
    self.progress = progress_lib.Progress(
        f'epoch {epoch + 1}/{self.epochs}', self.params.get('steps') or 1, 'steps',
        show=self.verbose > 0, bar=None if self.verbose == 1 else False,
        log_seconds=self.log_seconds, final_line=False, rate_unit='images',
        rate_per_unit=self.global_batch_size)

  def on_train_batch_end(self, batch, logs=None):
    step = _step(self.model)
    fields = {'bpd': f'{_value(logs, "bpd"):.4f}', 'grad_norm': f'{_value(logs, "grad_norm"):.3g}'}
    if self.show_loss:
      fields['loss'] = f'{_value(logs, "loss"):.4f}'
    fields['lr'] = f'{float(self.learning_rate(max(step - 1, 0))):.3g}'
    fields['step'] = f'{step}/{self.total_steps}'
    self.progress.update(1, **fields)

  def on_epoch_end(self, epoch, logs=None):
    self.progress.close()

  def on_train_end(self, logs=None):
    if self.progress is not None:
      self.progress.close()
