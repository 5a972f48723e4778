"""Whether a model is fit to be checkpointed: finite weights, and a finite log-likelihood.

Rules: every floating-point variable of the model is finite; with probe images (uint8
[B, H, W, C], the same on every worker), the model's log-likelihood of every one of them is
finite too, computed with one sample from the fixed stateless seed ``PROBE_SEED`` (weights can
be finite while the model gives NaN on every image). ``model_problem`` says what is wrong, or
None; the Checkpointer refuses to write, or to train from, a model with a problem
(``PoisonedWeightsError``).
"""

import numpy as np
import tensorflow as tf

PROBE_SEED = 0  # the stateless seed of the probe log-likelihood


class PoisonedWeightsError(RuntimeError):
  """The model's weights hold NaN or Inf, or the model gives a non-finite log-likelihood;
  nothing is saved."""


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
