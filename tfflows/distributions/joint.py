"""The prior of a multi-scale flow as a joint distribution over its latent structure.

With latents ordered top-down, [z_L, ..., z_1], the prior factorises as

    p(z_L, ..., z_1) = p_L(z_L) * prod_{i<L} p_i(z_i | r_i),     r_i = T_{i+1}^{-1}(z_{i+1}, r_{i+1})

where r_i, the half that went on at split i, is a function of the latents above it: the inverse
of the levels above. ``joint_prior`` writes this as a ``tfd.JointDistributionCoroutine`` that
inverts each level once per evaluation; latents may have any number of leading axes (none, for
one event), which the level inverses and the priors fold into one batch axis
(``bijectors.batching``). Its ``trainable_variables`` are those of the prior layers and of the
flow (the factors depend on both). The training path does not use it: the forward pass
already has every r_i (``MultiScaleFlow.encode`` returns them), so ``prior_log_prob`` evaluates
the same factors on those contexts; tests check that the two agree.
"""

import tensorflow as tf
import tensorflow_probability as tfp

from bijectors import base
from tfflows import random

tfd = tfp.distributions
Root = tfd.JointDistributionCoroutine.Root


def joint_prior(flow, priors, temperature=1.0, name='latent_prior'):
  """tfd.JointDistributionCoroutine over [z_L, ..., z_1].

  flow: a ``bijectors.multiscale.MultiScaleFlow``; priors: one prior layer per latent, top-down.
  """
  num = len(priors)

  def model():
    z = yield Root(priors[0].distribution(None, temperature))
    h = z
    for k in range(1, num):
      r, _ = flow.decode_level(num - k, h)
      z = yield priors[k].distribution(r, temperature)
      h = tf.concat([r, z], axis=-1)

  distribution = tfd.JointDistributionCoroutine(model, batch_ndims=0, name=name)
  return base.attach_layer_variables(distribution, list(priors) + flow.layers)


def prior_log_prob(priors, latents, contexts):
  """sum_i log p_i(z_i | r_i) with the contexts from the forward pass: [B]."""
  total = 0.
  for prior, z, r in zip(priors, latents, contexts):
    total = total + prior.distribution(r).log_prob(z)
  return total


def sample_top_down(flow, priors, num_samples, temperature=1.0, seed=None):
  """Draws latents top-down and inverts the flow level by level: returns (x, latents).

  Each level is inverted once; augmentation noise recovered by the inverse is dropped.
  seed: None (stateful sampling) or a stateless TFP seed (an int or a [2] int tensor).
  """
  num = len(priors)
  seeds = [None] * num
  if seed is not None:
    seeds = tfp.random.split_seed(random.stateless_seed(seed), n=num, salt='sample_top_down')
  z = priors[0].distribution(None, temperature).sample(num_samples, seed=seeds[0])
  latents, h = [z], z
  for k in range(1, num):
    r, _ = flow.decode_level(num - k, h)
    z = priors[k].distribution(r, temperature).sample(seed=seeds[k])
    latents.append(z)
    h = tf.concat([r, z], axis=-1)
  x, _ = flow.decode_level(0, h)
  return x, latents
