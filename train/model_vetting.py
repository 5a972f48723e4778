"""The training program's non-finite policy, in one place.

- A step whose loss or gradient norm is NaN or Inf applies no update (``FlowModel.train_step``
  zeroes its gradients and counts it in ``nonfinite_steps``); ``NonFiniteGuard`` then stops
  training (--on_nonfinite=stop) or skips the step (skip), stopping after
  --max_nonfinite_skips such steps in a row (``NonFiniteLossError``).
- A model is fit to be checkpointed, or trained from, when every floating-point variable is
  finite and, with probe images (uint8 [B, H, W, C], the same on every worker), its
  log-likelihood of every one of them is finite too, computed with one sample from the fixed
  stateless seed ``PROBE_SEED`` (weights can be finite while the model gives NaN on every
  image). ``model_problem`` says what is wrong, or None; the Checkpointer refuses to write, or
  to train from, a model with a problem (``PoisonedWeightsError``).
- Every such stop names the last good checkpoint a rerun resumes from (``resume_note``) and
  what to change (``ADVICE``).
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging

PROBE_SEED = 0  # the stateless seed of the probe log-likelihood
ADVICE = 'Try a longer --warmup_steps, a lower --learning_rate, or --max_grad_norm.'


class PoisonedWeightsError(RuntimeError):
  """The model's weights hold NaN or Inf, or the model gives a non-finite log-likelihood;
  nothing is saved."""


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or Inf loss or gradient norm."""


def resume_note(last_good):
  """What a rerun does, given the last good checkpoint (a prefix, or None)."""
  return (f'the last good checkpoint is {last_good}; rerunning resumes from it' if last_good
          else 'there is no checkpoint, so rerunning starts afresh')


def model_problem(model, probe_images=None):
  """Why the model is not fit to be saved (NaN or Inf weights, or with probe images a NaN or
  Inf log-likelihood of one of them), or None if it is."""
  for v in model.variables:
    if tf.as_dtype(v.dtype).is_floating and not np.all(np.isfinite(np.asarray(v))):
      return f'model variable {v.path} holds NaN or Inf'
  if probe_images is not None:
    bad = non_finite_log_prob(model, probe_images)
    if bad:
      return (f'the model gives a NaN or Inf log-likelihood for {bad} of '
              f'{len(probe_images)} probe test images although its weights are finite')
  return None


def non_finite_log_prob(model, images):
  """How many of ``images`` (uint8 [B, H, W, C]) the model gives a NaN or Inf log-likelihood
  (one seeded sample, non-XLA tf.function, inference mode)."""
  log_prob = model.log_prob(images, seed=PROBE_SEED).numpy()
  return int(np.sum(~np.isfinite(log_prob)))


class NonFiniteGuard(keras.callbacks.Callback):
  """Watches ``FlowModel.nonfinite_steps``, the count of training steps whose loss or gradient
  norm was NaN or Inf (such a step applied no gradient; the epoch's reported means take the
  NaN, as Keras' do). policy 'stop' raises NonFiniteLossError; 'skip' logs a warning and counts
  the skipped steps, and raises NonFiniteLossError once ``max_skips`` steps in a row were
  skipped (a model that gives NaN on every batch never recovers by skipping). last_good: a
  callable giving the last good checkpoint, for the message.

  The first callback of the list: a non-finite step stops training before the checkpoint
  callback can save it. The count is read once per batch, as the progress display reads the
  logs, so it adds no synchronisation beyond the one per batch the callbacks already make."""

  def __init__(self, policy='stop', max_skips=10, last_good=None):
    super().__init__()
    if policy not in ('stop', 'skip'):
      raise ValueError(f'policy must be stop or skip, got {policy!r}')
    if int(max_skips) < 1:
      raise ValueError(f'max_skips must be >= 1, got {max_skips}')
    self.policy = policy
    self.max_skips = int(max_skips)
    self.last_good = last_good
    self.skipped = 0        # all skipped steps of this run
    self.consecutive = 0    # skipped steps since the last finite one
    self._seen = 0          # the model's count at the last batch (on_train_begin reads it)

  def on_train_begin(self, logs=None):
    self._seen = self.model.nonfinite_steps

  def on_train_batch_end(self, batch, logs=None):
    count = self.model.nonfinite_steps
    # Any increase is this batch's step (under a strategy each replica may add its 1).
    nonfinite, self._seen = count != self._seen, count
    if not nonfinite:
      self.consecutive = 0
      return
    step = int(self.model.optimizer.iterations.numpy())
    message = f'non-finite loss or gradient norm at step {step}; the update was not applied'
    rerun = resume_note(self.last_good() if self.last_good else None)
    if self.policy == 'stop':
      self.model.stop_training = True
      raise NonFiniteLossError(f'{message}. Training stopped; {rerun}. {ADVICE} '
                               '(--on_nonfinite=skip skips such steps instead.)')
    self.skipped += 1
    self.consecutive += 1
    if self.consecutive >= self.max_skips:
      self.model.stop_training = True
      raise NonFiniteLossError(
          f'{self.consecutive} steps in a row (steps {step - self.consecutive + 1} to {step}) '
          f'had a non-finite loss or gradient and were skipped (--on_nonfinite=skip, at most '
          f'--max_nonfinite_skips={self.max_skips} in a row): training stopped; {rerun}. '
          f'{ADVICE}')
    logging.warning('%s (skipped %d so far, %d in a row; stopping at %d in a row).', message,
                    self.skipped, self.consecutive, self.max_skips)
