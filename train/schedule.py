"""Learning-rate schedule: linear warm-up, then exponential decay per epoch (DenseFlow, Glow)."""

import keras
import tensorflow as tf


class WarmupExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
  """lr(t) = base * min(1, (t + 1) / W) * decay ** floor(t / S)

  t: the 0-based index of the update (the optimizer's ``iterations`` before it is applied), so
  the first update uses base / W; W = warmup_steps (0: no warm-up); S = steps_per_epoch.
  The epoch count floor(t / S) runs from the start of training, so after the warm-up the rate
  is base * decay^epoch: the decay the DenseFlow paper describes and that really applies
  (its public code's warm-up scheduler overwrites it). Because lr depends on t alone, a
  resumed run continues the schedule exactly where the checkpoint left it.
  """

  def __init__(self, base, warmup_steps, decay, steps_per_epoch):
    if steps_per_epoch < 1:
      raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}.')
    self.base = float(base)
    self.warmup_steps = int(warmup_steps)
    self.decay = float(decay)
    self.steps_per_epoch = int(steps_per_epoch)

  def __call__(self, step):
    step = tf.cast(step, tf.int64)
    warm = 1.
    if self.warmup_steps:
      warm = tf.minimum(1., tf.cast(step + 1, tf.float32) / float(self.warmup_steps))
    epoch = tf.cast(step // self.steps_per_epoch, tf.float32)
    return self.base * warm * tf.pow(self.decay, epoch)

  def get_config(self):
    return {'base': self.base, 'warmup_steps': self.warmup_steps, 'decay': self.decay,
            'steps_per_epoch': self.steps_per_epoch}
