"""FlowModel: the Keras model every tfflows architecture is, and the public contract.

    model.log_prob(images, num_samples=1)   [B] nats for uint8 images [B, H, W, C]
    model.bits_per_dim(images, num_samples=1)
    model.sample(n, temperature=1.0, seed=None) -> uint8 [n, H, W, C]
    model.encode(images) / model.decode(latents)
    model.distribution                     tfd distribution over dequantized images x + u

For images x, dequantization noise u ~ q(u|x) and, in augmented flows (DenseFlow), noise
e ~ p*(e) = N(0, I), one joint sample gives the log-weight

    log w = log p(x + u, e) - log q(u | x) - log p*(e)
          = log p_prior(z) + log|det dz/d(x + u, e)| - log q(u | x) - log p*(e),

whose expectation lower-bounds log P(x) (the training objective, k = 1), and k samples give
the importance-weighted estimate log (1/k) sum_j w_j, which does not decrease in expectation
as k grows and tends to log P(x). Flows without augmentation and with uniform dequantization
have log p*(e) = log q = 0. Bits/dim = -log P / (D ln 2), with D = H * W * C of the image.
"""

import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfflows import random
from tfflows.distributions import joint
from tfflows.models import replica_step
from tfflows.nn.resnet import weight_norm_scales

tfd = tfp.distributions
tfb = tfp.bijectors


class FlowModel(keras.Model):
  """A multi-scale flow with its prior and dequantizer, trained by maximum likelihood.

  flow: ``bijectors.MultiScaleFlow`` from dequantized images [0, 256) to latents (top-down);
  priors: one prior layer per latent (top-down); dequantizer: a Keras layer
  ``(images, seed_generator, midpoint) -> (x + u, log q(u|x))``.
  """

  def __init__(self, config, flow, priors, dequantizer, iw_chunk_size=16, max_grad_norm=0.,
               scale_l2=0., **kwargs):
    super().__init__(name=config.model, **kwargs)
    self.config = config
    self.flow = flow
    self.priors = list(priors)
    self.dequantizer = dequantizer
    self.flow_layers = flow.layers
    self.seed_generator = keras.random.SeedGenerator(0)
    self.iw_chunk_size = iw_chunk_size
    self.max_grad_norm = max_grad_norm  # global-norm gradient clipping in train_step (0: off)
    self.scale_l2 = scale_l2  # L2 on weight-norm scales g (RealNVP / LCMA: 5e-5; 0: off)
    # Under a tf.distribute strategy: XLA-compile each replica's forward and backward
    # (tfflows.models.replica_step). Keras' own jit_compile must then be off (it would compile
    # the whole multi-replica step, which XLA cannot).
    self.replica_jit_compile = False
    self.image_shape = tuple(config.image_shape)
    self.num_dims = int(np.prod(self.image_shape))
    self._build_weights()

  # -- construction ---------------------------------------------------------------------------
  def _build_weights(self):
    """Creates every weight by one generative pass (which leaves ActNorm uninitialised, so the
    first training batch still initialises it) and one dequantizer pass."""
    joint.sample_top_down(self.flow, self.priors, 1, seed=0)
    self.dequantizer(tf.zeros((1,) + self.image_shape), midpoint=True)
    self.built = True

  # -- input checks ---------------------------------------------------------------------------
  def check_images(self, images):
    """Converts uint8 images [B, H, W, C] to float32, or raises ValueError naming the problem."""
    if not isinstance(images, tf.Tensor) or tf.executing_eagerly():
      images = _as_checked_array(images, self.image_shape)
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
      raise ValueError(f'Expected uint8 images with values in [0, 255], got dtype {images.dtype}.')
    if images.shape.rank != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f'Expected images of shape [batch, {", ".join(map(str, self.image_shape))}]'
                       f', got {images.shape}.')
    return tf.cast(images, tf.float32)

  # -- the likelihood -------------------------------------------------------------------------
  def call(self, images, training=None, seed=None):
    """One-sample log-weight log w (nats, [B]) of float images in {0..255}."""
    return self.log_weight(images, training=training, seed=seed)

  def log_weight(self, images, training=None, midpoint=False, seed=None):
    """log w for one joint draw of the noise. seed: None (the model's SeedGenerator) or a
    stateless [2] int seed, which makes the result deterministic."""
    seeds = _split_seeds(seed, 1 + len(self.flow.noise_shapes), self.seed_generator)
    values, log_q = self.dequantizer(images, seed=seeds[0], midpoint=midpoint)
    noise, log_p_noise = self._augmentation_noise(tf.shape(images)[0], zero=midpoint,
                                                  seeds=seeds[1:])
    latents, contexts, log_det = self.flow.encode(values, noise)
    log_p = joint.prior_log_prob(self.priors, latents, contexts)
    return log_p + log_det - log_q - log_p_noise

  def _augmentation_noise(self, batch, zero=False, seeds=None):
    noise, log_p = [], 0.
    seeds = seeds or [self.seed_generator] * len(self.flow.noise_shapes)
    for shape, seed in zip(self.flow.noise_shapes, seeds):
      full = tf.concat([[batch], shape], axis=0)
      e = tf.zeros(full) if zero else random.normal(full, seed)
      noise.append(e)
      log_p = log_p + tf.reduce_sum(tfd.Normal(0., 1.).log_prob(e), axis=[1, 2, 3])
    return noise, log_p

  def log_prob(self, images, num_samples=1, seed=None):
    """log P(images) in nats, [B]: the one-sample bound (k = 1) or the k-sample IW estimate.

    seed: None draws fresh noise; an int (or [2] tensor) makes the result deterministic."""
    images = self.check_images(images)
    if int(num_samples) < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}.')
    seed = None if seed is None else joint.stateless_seed(seed)
    return self._log_prob_fn(int(num_samples), seed is not None)(images, seed)

  def bits_per_dim(self, images, num_samples=1, seed=None):
    """-log P(images) / (D ln 2), [B]."""
    return self.to_bits_per_dim(self.log_prob(images, num_samples, seed))

  def to_bits_per_dim(self, log_prob):
    return -log_prob / (self.num_dims * math.log(2.))

  def _log_prob_fn(self, num_samples, seeded):
    """A tf.function per (k, seeded) so that repeated evaluation does not retrace."""
    cache = self.__dict__.setdefault('_log_prob_compiled', {})
    key = (num_samples, seeded)
    if key not in cache:
      # One trace with an unknown batch size (tfflows.export serves the same graph): with a
      # static batch, Grappler's arithmetic optimizer regroups the sums of log-terms into AddN,
      # which changes the result by an ulp, so the served log_prob would differ from this one.
      images_spec = tf.TensorSpec((None,) + self.image_shape, tf.float32)
      if seeded:
        fn = tf.function(lambda x, seed: self.estimate_log_prob(x, num_samples, seed),
                         input_signature=[images_spec, tf.TensorSpec([2], tf.int32)])
      else:
        fn = tf.function(lambda x: self.estimate_log_prob(x, num_samples),
                         input_signature=[images_spec])
      cache[key] = lambda x, seed: fn(x, seed) if seeded else fn(x)
    return cache[key]

  def estimate_log_prob(self, images, num_samples=1, seed=None):
    """Graph-friendly log P for float images: the bound (k = 1) or the IW estimate (k > 1)."""
    if num_samples == 1:
      return self(images, training=False, seed=seed)
    return self.importance_weighted(images, num_samples, seed)

  def importance_weighted(self, images, num_samples, seed=None):
    """log (1/k) sum_j w_j over k joint samples, in chunks with a running logsumexp.

    Chunks of ``iw_chunk_size`` samples are evaluated as one tiled batch, so memory stays that
    of a batch of B * chunk images for any k (k = 1000 included)."""
    chunk = min(self.iw_chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    batch = tf.shape(images)[0]
    tiled = tf.tile(images, [chunk, 1, 1, 1])
    running_max = tf.fill([batch], -np.inf)
    running_sum = tf.zeros([batch])
    for i in tf.range(num_chunks):
      valid = tf.minimum(chunk, num_samples - i * chunk)
      chunk_seed = None if seed is None else seed + tf.stack([i + 1, 0])
      log_w = tf.reshape(self(tiled, training=False, seed=chunk_seed), [chunk, batch])
      log_w = tf.where(tf.range(chunk)[:, None] < valid, log_w, -np.inf)
      new_max = tf.maximum(running_max, tf.reduce_max(log_w, axis=0))
      running_sum = (running_sum * tf.exp(running_max - new_max)
                     + tf.reduce_sum(tf.exp(log_w - new_max), axis=0))
      running_max = new_max
    return running_max + tf.math.log(running_sum) - tf.math.log(tf.cast(num_samples, tf.float32))

  # -- generation and latents -----------------------------------------------------------------
  def sample(self, n, temperature=1.0, seed=None):
    """n uint8 images [n, H, W, C] drawn top-down at the given temperature."""
    if int(n) < 1:
      raise ValueError(f'n must be >= 1, got {n}.')
    if float(temperature) < 0:
      raise ValueError(f'temperature must be >= 0, got {temperature}.')
    x = self.sample_values(int(n), temperature, seed)
    return to_images(x)

  def sample_values(self, n, temperature=1.0, seed=None):
    """Dequantized-scale samples in [0, 256) (float) before quantisation."""
    x, _ = joint.sample_top_down(self.flow, self.priors, n, temperature, seed)
    return x

  def encode(self, images):
    """Latents (top-down list) of uint8 images, dequantized at the bin centres x + 1/2 and with
    zero augmentation noise, so encoding is deterministic."""
    values = self.check_images(images) + 0.5
    noise, _ = self._augmentation_noise(tf.shape(values)[0], zero=True)
    latents, _, _ = self.flow.encode(values, noise)
    return latents

  def decode(self, latents):
    """uint8 images from latents (top-down list); augmentation noise is dropped."""
    x, _ = self.flow.decode(latents)
    return to_images(x)

  @property
  def distribution(self):
    """tfd.TransformedDistribution over dequantized images x + u in [0, 256)^D (for augmented
    flows, over the structure [x + u, e_1, ..., e_m]); its base is the joint prior over the
    latent structure, so its log_prob is exact."""
    return self.make_distribution()

  def make_distribution(self, temperature=1.0):
    prior = joint.joint_prior(self.flow, self.priors, temperature)
    return tfd.TransformedDistribution(prior, tfb.Invert(self.flow), name='flow_distribution')

  # -- Keras training -------------------------------------------------------------------------
  def compile(self, optimizer, **kwargs):
    super().compile(optimizer=optimizer, **kwargs)
    self.bpd_tracker = keras.metrics.Mean(name='bpd')
    self.grad_norm_tracker = keras.metrics.Mean(name='grad_norm')

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras' TensorFlow trainer, under a strategy, reads the first batch of fit / evaluate and
    # all-reduces it (a MEAN over replicas) only to build the model and the optimizer
    # symbolically. A FlowModel has every weight from construction, and that all-reduce of
    # uint8 images fails under MultiWorkerMirroredStrategy (CollectiveReduceV2 has no uint8
    # kernel), so the optimizer is built directly instead.
    if not self.built:
      super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
    elif self.optimizer is not None and not self.optimizer.built:
      with self.distribute_strategy.scope():
        self.optimizer.build(self.trainable_variables)

  @property
  def metrics(self):
    return [m for m in (getattr(self, 'bpd_tracker', None),
                        getattr(self, 'grad_norm_tracker', None)) if m is not None]

  def train_step(self, data):
    """One optimizer step. Under a tf.distribute strategy Keras runs it in each replica's
    context; ``replica_step`` has the forward and backward per replica (XLA-compiled per
    replica when ``replica_jit_compile``), one all-reduce of the mean gradient, and the update
    on the reduced gradients: the single-device step on the global batch (see there for what
    stays per replica)."""
    images = tf.cast(_images_of(data), tf.float32)
    bpd, loss, grads = replica_step.loss_and_gradients(self, images)
    bpd, loss, *grads = replica_step.mean_over_replicas([bpd, loss, *grads])
    grad_norm = tf.linalg.global_norm(grads)
    if self.max_grad_norm:
      grads, _ = tf.clip_by_global_norm(grads, self.max_grad_norm, use_norm=grad_norm)
    # A NaN or Inf loss or gradient would poison the weights: the step's gradients become zeros
    # (the weights stay finite; Adam-type optimizers still move them by their decayed moments)
    # and the trainer reports it. One broadcasting select per gradient.
    finite = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)
    grads = [tf.where(finite, g, tf.constant(0., g.dtype)) for g in grads]
    replica_step.apply_reduced_gradients(self.optimizer, zip(grads, self.trainable_variables))
    self.bpd_tracker.update_state(bpd)
    self.grad_norm_tracker.update_state(grad_norm)
    return replica_step.keras_logs({
        'bpd': self.bpd_tracker.result(), 'grad_norm': self.grad_norm_tracker.result(),
        'loss': loss, 'finite': tf.cast(finite, tf.float32)})

  def loss_and_gradients(self, images):
    """(bits/dim, loss, gradients) of float images [B, H, W, C]: the mean one-sample bound of
    the batch plus the regularisation, and its gradient for every trainable variable."""
    with tf.GradientTape() as tape:
      bpd = tf.reduce_mean(self.to_bits_per_dim(self(images, training=True)))
      loss = bpd + self.regularization()
    grads = tape.gradient(loss, self.trainable_variables)
    # ActNorm's first (data-initialising) call gives its weights no gradient: use zeros.
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self.trainable_variables)]
    return bpd, loss, grads

  def regularization(self):
    """scale_l2 * sum ||g||^2 over the weight-norm scales (zero when scale_l2 is 0)."""
    if not self.scale_l2:
      return 0.
    scales = weight_norm_scales(self)
    return self.scale_l2 * tf.add_n([tf.reduce_sum(tf.square(g)) for g in scales]) if scales else 0.

  def test_step(self, data):
    images = tf.cast(_images_of(data), tf.float32)
    with random.replica_rows(*replica_step.replica_position()):  # distinct noise per replica
      bpd = tf.reduce_mean(self.to_bits_per_dim(self(images, training=False)))
    self.bpd_tracker.update_state(bpd)
    return replica_step.keras_logs({'bpd': self.bpd_tracker.result()})


def _split_seeds(seed, num, seed_generator):
  """num stateless seeds derived from one [2] seed, or the SeedGenerator num times."""
  if seed is None:
    return [seed_generator] * num
  seed = tf.cast(seed, tf.int32)
  return [seed + tf.constant([0, 7919 * i], tf.int32) for i in range(num)]


def to_images(values):
  """Dequantized values in [0, 256) -> uint8 images (floor, clipped)."""
  return tf.cast(tf.clip_by_value(tf.floor(values), 0., 255.), tf.uint8)


def _images_of(data):
  return data[0] if isinstance(data, (tuple, list)) else data


def _as_checked_array(images, image_shape):
  """Eager checks with messages that name the problem; returns a uint8 numpy array."""
  array = np.asarray(images)
  if array.ndim != 4:
    raise ValueError(f'Expected a batch of images of rank 4 [batch, H, W, C], got rank '
                     f'{array.ndim} with shape {array.shape}.')
  if tuple(array.shape[1:]) != tuple(image_shape):
    raise ValueError(f'Expected images of shape [batch, {", ".join(map(str, image_shape))}], got '
                     f'{list(array.shape)}.')
  if array.dtype == np.uint8:
    return array
  if not np.issubdtype(array.dtype, np.integer):
    raise ValueError(f'Expected uint8 images (integers in [0, 255]), got dtype {array.dtype}; '
                     'convert floats with np.round(x).astype(np.uint8) if they are pixel values.')
  if array.size and (array.min() < 0 or array.max() > 255):
    raise ValueError(f'Image values must lie in [0, 255], got range [{array.min()}, '
                     f'{array.max()}].')
  return array.astype(np.uint8)
