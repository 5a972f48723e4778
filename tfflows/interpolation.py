"""mAR interpolation: latent paths that stay in high-density regions of the prior.

Linear interpolation in the latent space of a multi-scale flow (``tfflows.sampling``) draws the
straight line z_t^lin = (1 - t) z_A + t z_B between the latents of two images. Under a
multimodal prior such as mAR-SCF's, the middle of that line can cross low-density regions,
which decode to implausible images. The mAR-SCF paper (seed supplement, section E) optimises the
intermediate latents with Adamax (lr 5e-2, about 100 iterations, weights lambda1 ~ lambda2 in
[0.2, 0.5]) so that the path stays in high-density regions between x_A and x_B; its objective
(Eq. 11 of the main paper) is not in our sources, so this module defines its own:

Objective (what ``mar_interpolate_latents`` minimises). Let z = (z_L, ..., z_1) be the
top-down latent structure of the flow, D the number of latent dimensions (= H * W * C of the
image), and log p(z) the log-density of the joint prior,

    log p(z) = log p_L(z_L) + sum_(i<L) log p_i(z_i | r_i(z_(>i))),

with the contexts r_i obtained by inverting the levels above (as in sampling), so the gradient
of log p flows through the mAR priors, their embeddings of r_i and the level inverses. With
T = ``steps`` points t_k = k / (T - 1), the end points are fixed at z_0 = z_A and
z_(T-1) = z_B, and each interior point 0 < k < T - 1 minimises

    E_k(z_k) = -(lambda1 / D) log p(z_k) + (lambda2 / D) ||z_k - z_(t_k)^lin||^2,

i.e. the path minimises sum_k E_k. Starting point: z_k = z_(t_k)^lin. Optimiser: Adamax
(beta1 0.9, beta2 0.999, eps 1e-7) with learning rate 5e-2 for 100 iterations by default.

Why this form. E_k is, up to constants and the factor lambda1 / D, the negative log posterior
of an in-distribution latent z_k observed through Gaussian noise at the linear point:
z^lin ~ N(z_k, sigma^2 I) with sigma^2 = lambda1 / (2 lambda2). Its minimiser is the MAP
"projection" of the linear point onto the high-density regions of the prior: the first term
pulls z_k uphill on the mAR prior, the second keeps it at the position t_k along the path from
A to B (so the sequence still moves from A to B at an even pace and cannot collapse into one
mode, which a path-length term alone would allow), and it bounds how far the point may move
(sigma^2 = 0.5 per dimension for lambda1 = lambda2). The end points are not variables, so they
decode to x_A and x_B exactly. Dividing by D makes the weights independent of the image size.
The points decouple, so all interior points of all pairs are optimised as one batch.

Differentiating through level inverses needs inverses with gradients; mAR-SCF's MixLogCDF
couplings provide them (``bijectors.mixlogcdf``: implicit-function gradients), affine
couplings have them by construction.
"""

import numpy as np
import tensorflow as tf

from tfflows.models.flow_model import check_finite, to_images

ADAMAX_BETA1 = 0.9
ADAMAX_BETA2 = 0.999
ADAMAX_EPSILON = 1e-7


def latent_log_prob(model, latents):
  """log p(z) [B] of top-down latents under the model's joint prior, with each context r_i
  computed by inverting the levels above (differentiable in the latents)."""
  priors, flow = model.priors, model.flow
  num = len(priors)
  h = latents[0]
  total = priors[0].distribution(None).log_prob(latents[0])
  for k in range(1, num):
    r, _ = flow.decode_level(num - k, h)
    total = total + priors[k].distribution(r).log_prob(latents[k])
    h = tf.concat([r, latents[k]], axis=-1)
  return total


def linear_path(latents_a, latents_b, steps):
  """Top-down latents [pairs, steps, ...]: (1 - t) z_A + t z_B at t = 0, 1/(T-1), ..., 1."""
  t = tf.linspace(0., 1., steps)
  out = []
  for za, zb in zip(latents_a, latents_b):
    tt = tf.reshape(tf.cast(t, za.dtype), [1, steps] + [1] * (za.shape.rank - 1))
    out.append((1. - tt) * za[:, None] + tt * zb[:, None])
  return out


def mar_interpolate_latents(model, latents_a, latents_b, steps, iterations=100,
                            learning_rate=5e-2, lambda1=0.3, lambda2=0.3):
  """Optimises the interior points of the path (module docstring).

  latents_a, latents_b: top-down latent lists with a batch of `pairs`.
  Returns (path, info): path is a top-down list of [pairs, steps, ...] latents whose first and
  last points are latents_a and latents_b; info has 'log_prob' and 'log_prob_linear'
  ([pairs, steps] prior log-densities of the optimised and the linear path) and 'energy'
  (the mean of E_k over the interior points before and after, [2]).
  """
  steps, iterations = int(steps), int(iterations)
  if steps < 2:
    raise ValueError(f'steps must be >= 2 (the two end points), got {steps}.')
  if iterations < 0:
    raise ValueError(f'iterations must be >= 0, got {iterations}.')
  if lambda1 < 0 or lambda2 <= 0:
    raise ValueError(f'need lambda1 >= 0 and lambda2 > 0, got {lambda1}, {lambda2}.')
  lin = linear_path(latents_a, latents_b, steps)
  pairs = tf.shape(lin[0])[0]
  if steps == 2:
    interior = None
  else:
    interior = [tf.reshape(z[:, 1:-1], [-1] + z.shape[2:].as_list()) for z in lin]
    optimised, energy = _optimise(model, interior, int(iterations), float(learning_rate),
                                  float(lambda1), float(lambda2))
    inner = [tf.reshape(z, tf.concat([[pairs, steps - 2], tf.shape(z)[1:]], 0))
             for z in optimised]
  path = lin if interior is None else [
      tf.concat([z[:, :1], zi, z[:, -1:]], axis=1) for z, zi in zip(lin, inner)]
  info = {'log_prob': _path_log_prob(model, path), 'log_prob_linear': _path_log_prob(model, lin),
          'energy': tf.zeros([2]) if interior is None else energy}
  return path, info


def mar_interpolation(model, images_a, images_b, steps, iterations=100, learning_rate=5e-2,
                      lambda1=0.3, lambda2=0.3, return_info=False):
  """mAR interpolation between uint8 images: uint8 [pairs, steps, H, W, C].

  images_a, images_b: uint8 [pairs, H, W, C]; steps >= 2 counts both end points, which are the
  decoded latents of the inputs (the inputs themselves for an accurate inverse). With
  return_info, also returns the info dict of ``mar_interpolate_latents``.
  """
  images_a, images_b = np.asarray(images_a), np.asarray(images_b)
  if images_a.shape != images_b.shape:
    raise ValueError(f'images_a and images_b must have the same shape, got {images_a.shape} '
                     f'and {images_b.shape}.')
  latents_a, latents_b = model.encode(images_a), model.encode(images_b)
  path, info = mar_interpolate_latents(model, latents_a, latents_b, steps, iterations,
                                       learning_rate, lambda1, lambda2)
  flat = [tf.reshape(z, [-1] + z.shape[2:].as_list()) for z in path]
  x, _ = model.flow.decode(flat)
  images = tf.reshape(to_images(check_finite(x, 'mar_interpolation')),
                      [-1, int(steps)] + list(model.image_shape))
  return (images, info) if return_info else images


def _path_log_prob(model, path):
  steps = path[0].shape[1]
  flat = [tf.reshape(z, [-1] + z.shape[2:].as_list()) for z in path]
  return tf.reshape(_log_prob_fn(model)(flat), [-1, steps])


def _log_prob_fn(model):
  cache = model.__dict__.setdefault('_interpolation_fns', {})
  if 'log_prob' not in cache:
    cache['log_prob'] = tf.function(lambda z: latent_log_prob(model, z))
  return cache['log_prob']


def _optimise(model, lin, iterations, learning_rate, lambda1, lambda2):
  """Adamax on sum_k E_k over the batch of interior points; returns (points, energy [2])."""
  cache = model.__dict__.setdefault('_interpolation_fns', {})
  key = ('optimise', iterations, learning_rate, lambda1, lambda2)
  if key not in cache:
    cache[key] = tf.function(lambda z: _adamax_loop(model, z, iterations, learning_rate,
                                                    lambda1, lambda2))
  return cache[key](lin)


def _adamax_loop(model, lin, iterations, learning_rate, lambda1, lambda2):
  num_dims = float(sum(np.prod(z.shape[1:]) for z in lin))

  def energy(z):
    """E_k [B] for every interior point."""
    sq = tf.add_n([tf.reduce_sum(tf.square(a - b), axis=[1, 2, 3]) for a, b in zip(z, lin)])
    return (-lambda1 * latent_log_prob(model, z) + lambda2 * sq) / num_dims

  def body(i, z, m, u):
    with tf.GradientTape() as tape:
      tape.watch(z)
      total = tf.reduce_sum(energy(z))
    grads = tape.gradient(total, z)
    step = tf.cast(i + 1, tf.float32)
    rate = learning_rate / (1. - tf.pow(ADAMAX_BETA1, step))
    new_m = [ADAMAX_BETA1 * mi + (1. - ADAMAX_BETA1) * g for mi, g in zip(m, grads)]
    new_u = [tf.maximum(ADAMAX_BETA2 * ui, tf.abs(g)) for ui, g in zip(u, grads)]
    new_z = [zi - tf.cast(rate, zi.dtype) * mi / (ui + ADAMAX_EPSILON)
             for zi, mi, ui in zip(z, new_m, new_u)]
    return i + 1, new_z, new_m, new_u

  zeros = [tf.zeros_like(z) for z in lin]
  _, z, _, _ = tf.while_loop(lambda i, *unused: i < iterations, body,
                             (tf.constant(0), list(lin), zeros, list(zeros)))
  before = tf.reduce_mean(energy(lin))
  after = tf.reduce_mean(energy(z))
  return z, tf.stack([before, after])
