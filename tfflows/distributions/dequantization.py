"""Dequantization: from discrete images to a continuous density, as part of the model.

For an image x in {0..255}^D and noise u in [0, 1)^D drawn from q(u | x), v = x + u is a
dequantized image in [0, 256)^D and (Theis et al. 2016; Ho et al. 2019)

    log P(x) >= E_q[ log p(x + u) - log q(u | x) ].

Uniform dequantization has q = U(0, 1)^D, so log q = 0. Every flow in tfflows starts with
``bijectors.ToUnitInterval`` (v / 256 - 0.5, log-det -D ln 256), so p is a density over
[0, 256)^D and the bound above is directly a discrete-data log-likelihood.
"""

import keras

from tfflows import random
import tensorflow as tf


class UniformDequantizer(keras.layers.Layer):
  """q(u | x) = U(0, 1)^D."""

  def call(self, images, seed=None, midpoint=False):
    """images: float [B, H, W, C] in {0..255}; seed: a keras.random.SeedGenerator or a stateless
    [2] int tensor. Returns (v = x + u, log q(u | x) = 0 [B])."""
    if midpoint:
      u = 0.5 * tf.ones_like(images)
    else:
      u = random.uniform(tf.shape(images), seed, images.dtype)
    return images + u, tf.zeros(tf.shape(images)[:1], images.dtype)
