"""FlowModel: the Keras model every tfflows architecture is, and the public contract.

    model.log_prob(images, num_samples=1)   [B] nats for uint8 images [B, H, W, C]
    model.bits_per_dim(images, num_samples=1)
    model(images) / model.predict(images)   [B] nats: the one-sample bound, fresh noise
    model.save('m.keras') / keras.models.load_model('m.keras')
    model.sample(n, temperature=1.0, seed=None) -> uint8 [n, H, W, C]
    model.encode(images) / model.decode(latents)
    model.distribution                     tfd distribution over dequantized images x + u

With a seed, ``log_prob`` draws each image's noise from a stateless seed folded from that image's
pixels and the seed (``tfflows.random.example_seeds``): an image's number is a function of the
image and the seed alone, the same whatever batch it is evaluated in. ``sample`` and ``decode``
raise ``NonFiniteError`` rather than turn NaN or Inf values into pixels.

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
from absl import logging

from bijectors import actnorm
from bijectors.base import attach_layer_variables
from tfflows import random, split_permutations
from tfflows.config import FlowConfig
from tfflows.distributions import joint
from tfflows.models import replica_step
from tfflows.nn.resnet import weight_norm_scales

tfd = tfp.distributions
tfb = tfp.bijectors


# compile's settings of the objective and update (saved by get_compile_config).
TRAINING_SETTINGS = ('max_grad_norm', 'scale_l2')


class NonFiniteError(FloatingPointError):
  """The model produced NaN or Inf values where an image or a number was asked for."""


def refuse_non_finite(values, what, consequence):
  """values (per-image numbers, array-like [B]) as a numpy array, or NonFiniteError
  '{what}: the model gives NaN or Inf for N of B images; {consequence} (...)': the one refusal
  of non-finite per-image numbers (eval, export, OOD scores, typicality)."""
  values = np.asarray(values)
  bad = ~np.isfinite(values)
  if bad.any():
    raise NonFiniteError(f'{what}: the model gives NaN or Inf for {int(bad.sum())} of '
                         f'{bad.size} images; {consequence} (a model that gives them is '
                         'broken: check the checkpoint it was restored from).')
  return values


@keras.saving.register_keras_serializable(package='tfflows')
class FlowModel(keras.Model):
  """A multi-scale flow with its prior and dequantizer, trained by maximum likelihood.

  flow: ``bijectors.MultiScaleFlow`` from dequantized images [0, 256) to latents (top-down);
  priors: one prior layer per latent (top-down); dequantizer: a Keras layer
  ``(images, seed_generator, midpoint) -> (x + u, log q(u|x))``.
  """

  # ``tfflows.models.build_model``, which sets it on import (the builders sit above this
  # module): ``from_config`` rebuilds a saved model's architecture with it.
  builder = None

  def __init__(self, config, flow, priors, dequantizer, iw_chunk_size=16, **kwargs):
    super().__init__(name=config.model, **kwargs)
    self.config = config
    self.flow = flow
    self.priors = list(priors)
    self.dequantizer = dequantizer
    self.flow_layers = flow.layers
    self.seed_generator = keras.random.SeedGenerator(0)
    self.iw_chunk_size = iw_chunk_size
    # The training settings, which ``compile`` sets (see there): off until then.
    self.max_grad_norm = 0.
    self.scale_l2 = 0.
    self.replica_jit_compile = False
    self.image_shape = tuple(config.image_shape)
    self.num_dims = int(np.prod(self.image_shape))
    # The flow's float type: the variable dtype of the Keras policy the model is built under
    # (float32 by default, float64 under a float64 policy; mixed policies keep float32 flows).
    self.flow_dtype = tf.as_dtype(self.dtype_policy.variable_dtype)
    self._build_weights()

  # -- construction ---------------------------------------------------------------------------
  def _build_weights(self):
    """Creates every weight by one generative pass (ActNorm stays uninitialised, the identity,
    until ``initialize``) and one dequantizer pass."""
    joint.sample_top_down(self.flow, self.priors, 1, seed=0)
    self.dequantizer(tf.zeros((1,) + self.image_shape, self.flow_dtype), midpoint=True)
    self.built = True

  # -- Keras saving -----------------------------------------------------------------------------
  def get_config(self):
    """What ``model.save('m.keras')`` stores to rebuild the model: the ``FlowConfig`` fields
    and, for LCMA (``config.lcma_masks``), the masks file's bytes, so the permutations travel
    inside the .keras file. The training settings are ``compile``'s (``get_compile_config``)."""
    config = {'flow_config': self.config.to_dict(), 'iw_chunk_size': self.iw_chunk_size}
    if self.config.lcma_masks:
      config['lcma_masks_npz'] = split_permutations.encode_masks_file(self.config.lcma_masks)
    return config

  @classmethod
  def from_config(cls, config):
    """The model ``get_config`` describes, built by ``tfflows.build_model`` (weights fresh;
    ``keras.models.load_model`` then loads the saved ones). LCMA masks come back as a file of
    ``split_permutations.stored_masks_path`` that the rebuilt config names."""
    flow_config = FlowConfig.from_dict(config['flow_config'])
    if 'lcma_masks_npz' in config:
      flow_config = flow_config.replace(
          lcma_masks=split_permutations.stored_masks_path(config['lcma_masks_npz']))
    model = FlowModel.builder(flow_config)
    model.iw_chunk_size = config['iw_chunk_size']
    # Files written before the training settings moved to ``compile`` hold them here:
    # ``compile_from_config`` takes them unless the compile config has its own.
    model.__dict__['_saved_training_settings'] = {
        k: config[k] for k in TRAINING_SETTINGS if k in config}
    return model

  def export(self, filepath, format='tf_saved_model', **kwargs):  # pylint: disable=redefined-builtin
    """Refuses Keras' generic export, naming the one that serves this model."""
    raise NotImplementedError(
        'FlowModel.export: Keras\' generic SavedModel export would serve the model\'s '
        'randomised one-sample bound without its seeds, checks and sampling signature. Export '
        f'with tfflows.export.export_saved_model(model, {str(filepath)!r}) (or python -m '
        'train.main --mode=export): TF Serving signatures serving_default (log_prob, '
        'bits_per_dim of uint8 images), sample, ood; docs/serving.md.')

  # -- data-dependent initialisation ----------------------------------------------------------
  @property
  def is_initialized(self):
    """True once every ActNorm has been initialised (by ``initialize`` or a restore)."""
    return actnorm.actnorm_state(self)[0] == 0

  def initialize(self, images):
    """ActNorm's data-dependent initialisation on a batch of real training images.

    images: uint8 [B, H, W, C] (the first training batch). One training-mode pass of the
    one-sample log-weight runs inside ``bijectors.actnorm.data_initialization()``: every
    uninitialised ActNorm, in flow order, sets loc and log_scale so that its input comes out
    with zero mean and unit variance per channel (Glow, section 3.1), and later steps see the
    normalised outputs. Already initialised ActNorms keep their weights; batch-norm moving
    statistics take one update from this batch, as from a training step. Only training calls
    this (the training program, or ``fit`` on an uninitialised model): inference never changes
    weights, and an uninitialised ActNorm is the identity.
    Returns the number of ActNorm channels left unscaled because their spread on this batch was
    below ``bijectors.actnorm.MIN_STD`` (logged when > 0).
    """
    values = self.check_images(images)
    with actnorm.data_initialization():
      self.log_weight(values, training=True)
    fresh, unscaled = actnorm.actnorm_state(self)
    if fresh:
      raise RuntimeError(f'{fresh} ActNorm layers were not reached by the initialisation pass.')
    if unscaled:
      logging.warning('ActNorm initialisation: %d channel(s) had a spread below %g on the '
                      'initialisation batch (e.g. uniform images) and were only centred, not '
                      'scaled.', unscaled, actnorm.MIN_STD)
    return unscaled

  def fit(self, x=None, *args, **kwargs):  # pylint: disable=keyword-arg-before-vararg
    """Keras ``fit``; an uninitialised model first runs ``initialize`` on the first batch of x
    (a tf.data.Dataset of images, (images, ...) tuples or {'image': images, ...} dicts as
    ``tfds.load`` gives, or an array of images)."""
    if not self.is_initialized:
      self.initialize(_first_batch(x, kwargs.get('batch_size')))
    return super().fit(x, *args, **kwargs)

  # -- input checks ---------------------------------------------------------------------------
  def check_images(self, images):
    """Converts uint8 images [B, H, W, C] to ``flow_dtype``, or raises ValueError naming the
    problem."""
    if not isinstance(images, tf.Tensor) or tf.executing_eagerly():
      images = _as_checked_array(images, self.image_shape)
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
      raise ValueError(f'Expected uint8 images with values in [0, 255], got dtype {images.dtype}.')
    if images.shape.rank != 4 or tuple(images.shape[1:]) != self.image_shape:
      raise ValueError(f'Expected images of shape [batch, {", ".join(map(str, self.image_shape))}]'
                       f', got {images.shape}.')
    return tf.cast(images, self.flow_dtype)

  # -- the likelihood -------------------------------------------------------------------------
  def call(self, images, training=None, seed=None):
    """One-sample log-weight log w in nats, [B]: the k = 1 bound of log P(images) that
    ``model(images)`` and ``model.predict(images)`` give (``model.log_prob`` has k > 1 and
    seeds; ``to_bits_per_dim`` converts). images: uint8 [B, H, W, C], or integer or float
    values holding whole pixel values in [0, 255]; anything else (e.g. floats scaled to
    [0, 1]) is refused (ValueError eagerly, InvalidArgumentError in a graph)."""
    return self.log_weight(pixel_values(images, self.flow_dtype), training=training, seed=seed)

  def log_weight(self, images, training=None, midpoint=False, seed=None):
    """log w for one joint draw of the noise. seed: None (the model's SeedGenerator), a
    stateless [2] int seed (one stream over the whole batch), or [B, 2] per-image seeds
    (``tfflows.random.example_seeds``: image b's noise depends on seed[b] only); a stateless
    seed makes the result deterministic."""
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
      e = tf.zeros(full, self.flow_dtype) if zero else random.normal(full, seed, self.flow_dtype)
      noise.append(e)
      log_p = log_p + tf.reduce_sum(tfd.Normal(tf.zeros([], e.dtype), 1.).log_prob(e),
                                    axis=[1, 2, 3])
    return noise, log_p

  def log_prob(self, images, num_samples=1, seed=None):
    """log P(images) in nats, [B]: the one-sample bound (k = 1) or the k-sample IW estimate.

    seed: None draws fresh noise; an int (or [2] tensor) makes the result deterministic, and
    then each image's noise comes from a seed folded from its own pixels and ``seed``, so its
    number does not depend on the other images of the batch (nor on their number or order)."""
    images = self.check_images(images)
    if int(num_samples) < 1:
      raise ValueError(f'num_samples must be >= 1, got {num_samples}.')
    seed = None if seed is None else random.stateless_seed(seed)
    return self._log_prob_fn(int(num_samples), seed is not None)(images, seed)

  def bits_per_dim(self, images, num_samples=1, seed=None):
    """-log P(images) / (D ln 2), [B]."""
    return self.to_bits_per_dim(self.log_prob(images, num_samples, seed))

  def to_bits_per_dim(self, log_prob):
    """bits/dim = -log_prob / (D ln 2), log_prob in nats (any shape, float). The one formula
    of the project: training metrics, eval and the served signatures all call it. A division
    by a constant would be rewritten by Grappler into a multiplication by its reciprocal in a
    graph (1 ulp off the eager number in ~13% of cases); ``divide_no_nan`` is not rewritten,
    so a served number equals the eager one exactly."""
    log_prob = tf.convert_to_tensor(log_prob)
    nats_per_bit_dim = tf.constant(self.num_dims * math.log(2.), log_prob.dtype)
    return tf.math.divide_no_nan(-log_prob, nats_per_bit_dim)

  def _log_prob_fn(self, num_samples, seeded):
    """A tf.function per (k, seeded) so that repeated evaluation does not retrace."""
    cache = self.__dict__.setdefault('_log_prob_compiled', {})
    key = (num_samples, seeded)
    if key not in cache:
      # One trace with an unknown batch size (tfflows.export serves the same graph): with a
      # static batch, Grappler's arithmetic optimizer regroups the sums of log-terms into AddN,
      # which changes the result by an ulp, so the served log_prob would differ from this one.
      images_spec = tf.TensorSpec((None,) + self.image_shape, self.flow_dtype)
      if seeded:
        fn = tf.function(lambda x, seed: self.estimate_log_prob(x, num_samples, seed),
                         input_signature=[images_spec, tf.TensorSpec([2], tf.int32)])
      else:
        fn = tf.function(lambda x: self.estimate_log_prob(x, num_samples),
                         input_signature=[images_spec])
      cache[key] = lambda x, seed: fn(x, seed) if seeded else fn(x)
    return cache[key]

  def estimate_log_prob(self, images, num_samples=1, seed=None):
    """Graph-friendly log P for float images: the bound (k = 1) or the IW estimate (k > 1).

    seed: None (the SeedGenerator) or a stateless [2] seed, folded per image (see log_prob).
    An empty batch [0, H, W, C] gives an empty result [0] (the networks never see it)."""
    def estimate():
      image_seeds = None if seed is None else random.example_seeds(images, seed)
      if num_samples == 1:
        return self(images, training=False, seed=image_seeds)
      return self.importance_weighted(images, num_samples, image_seeds)

    empty = tf.zeros([0], images.dtype)
    if images.shape[0] is not None:
      return estimate() if images.shape[0] else empty
    return tf.cond(tf.shape(images)[0] > 0, estimate, lambda: empty)

  def importance_weighted(self, images, num_samples, seed=None):
    """log (1/k) sum_j w_j over k joint samples, in chunks with a running logsumexp.

    Chunks of ``iw_chunk_size`` samples are evaluated as one tiled batch, so memory stays that
    of a batch of B * chunk images for any k (k = 1000 included). seed: None or [B, 2]
    per-image seeds; sample j of image b draws from fold_in(seed[b], j)."""
    chunk = min(self.iw_chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    batch = tf.shape(images)[0]
    tiled = tf.tile(images, [chunk, 1, 1, 1])   # row j * B + b: sample j of image b
    if seed is not None:
      tiled_seeds = tf.tile(seed, [chunk, 1])
      sample_in_chunk = tf.repeat(tf.range(chunk), batch)
    running_max = tf.fill([batch], tf.constant(-np.inf, images.dtype))
    running_sum = tf.zeros([batch], images.dtype)
    for i in tf.range(num_chunks):
      valid = tf.minimum(chunk, num_samples - i * chunk)
      chunk_seed = None if seed is None else random.fold_in(tiled_seeds,
                                                             i * chunk + sample_in_chunk)
      log_w = tf.reshape(self(tiled, training=False, seed=chunk_seed), [chunk, batch])
      log_w = tf.where(tf.range(chunk)[:, None] < valid, log_w, -np.inf)
      new_max = tf.maximum(running_max, tf.reduce_max(log_w, axis=0))
      running_sum = (running_sum * tf.exp(running_max - new_max)
                     + tf.reduce_sum(tf.exp(log_w - new_max), axis=0))
      running_max = new_max
    return running_max + tf.math.log(running_sum) - tf.math.log(tf.cast(num_samples, images.dtype))

  # -- generation and latents -----------------------------------------------------------------
  def sample(self, n, temperature=1.0, seed=None):
    """n uint8 images [n, H, W, C] drawn top-down at the given temperature.

    seed: an integer in the int32 range, or None for fresh randomness (a seed drawn from
    TensorFlow's global generator, which ``keras.utils.set_random_seed`` seeds). The draw runs
    one traced function (``_sample_fn``) that traces the body the served ``sample`` signature
    traces, with the same inputs, so it equals the served images for the same arguments bit for
    bit, in every network precision.
    Raises ValueError for n < 1, a temperature that is negative, NaN or infinite, or a seed that
    is not an int32, and NonFiniteError if the model's samples hold NaN or Inf (a broken model:
    no black or white images are returned in their place)."""
    if int(n) < 1:
      raise ValueError(f'n must be >= 1, got {n}.')
    check_temperature(temperature)
    x = self._sample_fn()(tf.constant(int(n), tf.int32), tf.constant(temperature, tf.float32),
                          _sample_seed(seed))
    what = f'model.sample(n={int(n)}, temperature={temperature})'
    return to_images(check_finite(check_sample_overflow(x, temperature, what), what))

  def _sample_fn(self):
    """``sample_values`` as one tf.function per model (not retraced), with the inputs of the
    served ``sample`` signature: num_samples int32 [], temperature float32 [], seed int32 [].
    Eager execution can round differently from a graph (Grappler fuses ops there, e.g. a
    convolution with its bias and activation, and bfloat16 networks then round at other
    places), so eager samples could differ from the served ones."""
    fn = self.__dict__.get('_sample_compiled')   # not a Keras-tracked attribute
    if fn is None:
      fn = tf.function(self.sample_values, input_signature=[
          tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.float32),
          tf.TensorSpec([], tf.int32)])
      self.__dict__['_sample_compiled'] = fn
    return fn

  def sample_values(self, n, temperature=1.0, seed=None):
    """Dequantized-scale samples [n, H, W, C] in [0, 256) (float) before quantisation: the body
    that ``sample`` and the served ``sample`` signature trace (eager here when called eagerly).
    seed: None (stateful sampling) or a stateless seed (``joint.sample_top_down``); temperature
    a number or a float tensor of any float dtype (the served float32 one in a float64 model)."""
    temperature = tf.cast(temperature, self.flow_dtype)
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
    """uint8 images [B, H, W, C] from latents: the list ``encode`` returns, top-down, each
    [B, h, w, c] (``flow.latent_shapes``); augmentation noise is dropped. Raises ValueError
    naming the expected count, order and shapes for anything else, and NonFiniteError if the
    decoded values hold NaN or Inf."""
    latents = self.flow.check_latents(latents)
    for k, z in enumerate(latents):
      if z.shape.rank != 4:
        raise ValueError(f'decode: latent {k} (top-down) has shape {z.shape.as_list()}; '
                         f'expected a batch [B, {", ".join(map(str, self.flow.latent_shapes[k]))}]'
                         f' of the {self.flow.describe_latents()}.')
    x, _ = self.flow.decode([tf.cast(z, self.flow_dtype) for z in latents])
    return to_images(check_finite(x, 'model.decode'))

  @property
  def distribution(self):
    """tfd.TransformedDistribution over dequantized images x + u in [0, 256)^D (for augmented
    flows, over the structure [x + u, e_1, ..., e_m]); its base is the joint prior over the
    latent structure, so its log_prob is exact.

    TFP's contract holds: any sample shape (``sample()`` gives one [H, W, C] image), any number
    of leading axes in ``log_prob`` (one image gives a scalar), batch shape [], and
    ``trainable_variables`` are the model's weights minus the dequantizer's, so a tape over
    ``log_prob`` and an optimizer over ``trainable_variables`` train the model."""
    return self.make_distribution()

  def make_distribution(self, temperature=1.0):
    """``distribution`` with the prior at the given temperature."""
    prior = joint.joint_prior(self.flow, self.priors, temperature)
    distribution = tfd.TransformedDistribution(prior, tfb.Invert(self.flow),
                                               name='flow_distribution')
    # TFP's variable walk expands composite distributions (the joint prior) into their tensor
    # parts instead of visiting their attributes, so the priors' weights are attached here too.
    return attach_layer_variables(distribution, list(self.priors) + self.flow.layers)

  # -- Keras training -------------------------------------------------------------------------
  def compile(self, optimizer, max_grad_norm=0., scale_l2=0., jit_compile='auto', **kwargs):
    """Keras ``compile`` with the training settings of the model's own objective (``loss`` is
    not an argument); ``.keras`` files keep all three (``get_compile_config``).

    max_grad_norm: clip the gradients to this global norm in ``train_step`` (0: off; LCMA: 100).
    scale_l2: L2 penalty on the weight-norm scales g, added to the loss (RealNVP / LCMA: 5e-5).
    jit_compile: as Keras'. True on a model built under a tf.distribute strategy's scope
      compiles each replica's forward and backward pass as one XLA program
      (``replica_step``) and keeps Keras' whole-step XLA off, which cannot compile a step with
      its all-reduce; 'auto' follows Keras (no XLA under a strategy or on a CPU).

    Reported metrics (epoch means, as every Keras metric): ``loss``, what the
    optimiser minimises (bits/dim plus the regularisation; in ``evaluate``, and ``val_loss``
    with validation data, the same on the evaluated images, so Keras callbacks that monitor
    ``val_loss`` by default act on it), ``bpd`` (bits/dim, the one-sample bound) and, in
    training, ``grad_norm`` (global norm before clipping)."""
    if kwargs.get('loss') is not None:
      raise ValueError('FlowModel.compile takes no loss: the model minimises its negative '
                       'log-likelihood in bits/dim (plus its regularisation).')
    self.max_grad_norm = float(max_grad_norm)
    self.scale_l2 = float(scale_l2)
    self.replica_jit_compile = (jit_compile != 'auto' and bool(jit_compile)
                                and self._distribute_strategy is not None)
    self.__dict__['_jit_compile_asked'] = jit_compile   # saved as asked, decided per strategy
    # The per-replica step traced under the previous settings (scale_l2 is traced into it).
    self.__dict__.pop('_replica_step_compiled', None)
    # Keras resolves 'auto' itself (no XLA on a CPU-only machine or under a strategy).
    super().compile(optimizer=optimizer,
                    jit_compile=False if self.replica_jit_compile else jit_compile, **kwargs)
    self.loss_tracker = keras.metrics.Mean(name='loss')
    self.bpd_tracker = keras.metrics.Mean(name='bpd')
    self.grad_norm_tracker = keras.metrics.Mean(name='grad_norm')
    # Steps whose loss or gradient was NaN or Inf (no update applied): not a reported metric;
    # train/model_vetting.NonFiniteGuard reads it after each batch.
    self.nonfinite_tracker = keras.metrics.Sum(name='nonfinite_steps')

  def get_compile_config(self):
    """Keras' compile config plus the training settings (``compile``'s arguments)."""
    config = super().get_compile_config()
    if config:
      config.update(max_grad_norm=self.max_grad_norm, scale_l2=self.scale_l2,
                    jit_compile=self.__dict__.get('_jit_compile_asked', 'auto'))
    return config

  def compile_from_config(self, config):
    """Recompiles a loaded model as it was compiled (``keras.models.load_model``), with its
    optimizer built so that the saved optimizer state loads into it."""
    settings = self.__dict__.pop('_saved_training_settings', {})
    self.compile(**{**settings, **keras.saving.deserialize_keras_object(config)})
    self.optimizer.build(self.trainable_variables)

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
    return [m for m in (getattr(self, 'loss_tracker', None), getattr(self, 'bpd_tracker', None),
                        getattr(self, 'grad_norm_tracker', None)) if m is not None]

  @property
  def nonfinite_steps(self):
    """How many training steps since ``compile`` had a NaN or Inf loss or gradient (each
    applied no update); a host read, for callbacks."""
    tracker = getattr(self, 'nonfinite_tracker', None)
    return 0 if tracker is None else int(tracker.result())

  def train_step(self, data):
    """One optimizer step. Under a tf.distribute strategy Keras runs it in each replica's
    context; ``replica_step`` has the forward and backward per replica (XLA-compiled per
    replica when ``compile`` asked for XLA under a strategy), one all-reduce of the mean
    gradient, and the update on the reduced gradients: the single-device step on the global
    batch (see there for what stays per replica)."""
    bpd, loss, grads = replica_step.loss_and_gradients(self, _images_of(data))
    bpd, loss, *grads = replica_step.mean_over_replicas([bpd, loss, *grads])
    grad_norm = tf.linalg.global_norm(grads)
    if self.max_grad_norm:
      grads, _ = tf.clip_by_global_norm(grads, self.max_grad_norm, use_norm=grad_norm)
    # A NaN or Inf loss or gradient would poison the weights: the step's gradients become zeros
    # (the weights stay finite; Adam-type optimizers still move them by their decayed moments)
    # and the step is counted in ``nonfinite_steps``. One broadcasting select per gradient.
    # The reported means take the NaN, as Keras' do (keras.callbacks.TerminateOnNaN acts on it).
    finite = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)
    grads = [tf.where(finite, g, tf.constant(0., g.dtype)) for g in grads]
    replica_step.apply_reduced_gradients(self.optimizer, zip(grads, self.trainable_variables))
    self.loss_tracker.update_state(loss)
    self.bpd_tracker.update_state(bpd)
    self.grad_norm_tracker.update_state(grad_norm)
    self.nonfinite_tracker.update_state(1. - tf.cast(finite, tf.float32))
    return replica_step.keras_logs({m.name: m.result() for m in self.metrics})

  def loss_and_gradients(self, images):
    """(bits/dim, loss, gradients) of float images [B, H, W, C]: the mean one-sample bound of
    the batch plus the regularisation, and its gradient for every trainable variable."""
    with tf.GradientTape() as tape:
      bpd = tf.reduce_mean(self.to_bits_per_dim(self(images, training=True)))
      loss = bpd + self.regularization()
    grads = tape.gradient(loss, self.trainable_variables)
    # A weight the loss does not reach (none in the shipped models) gets a zero gradient.
    grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self.trainable_variables)]
    return bpd, loss, grads

  def regularization(self):
    """scale_l2 * sum ||g||^2 over the weight-norm scales (zero when scale_l2 is 0)."""
    if not self.scale_l2:
      return 0.
    scales = weight_norm_scales(self)
    return self.scale_l2 * tf.add_n([tf.reduce_sum(tf.square(g)) for g in scales]) if scales else 0.

  def test_step(self, data):
    """``evaluate``'s step: bpd, the batch's mean bits/dim (one-sample bound), and loss, bpd
    plus the regularisation (what training minimises)."""
    with random.replica_rows(*replica_step.replica_position()):  # distinct noise per replica
      bpd = tf.reduce_mean(self.to_bits_per_dim(self(_images_of(data), training=False)))
    self.bpd_tracker.update_state(bpd)
    self.loss_tracker.update_state(bpd + self.regularization())
    return replica_step.keras_logs({m.name: m.result() for m in (self.loss_tracker,
                                                                 self.bpd_tracker)})

  def predict_step(self, data):
    """``predict``'s step: the one-sample log-weight (nats, [B]) of each image, as ``call``."""
    return self(_images_of(data), training=False)


def pixel_values(images, dtype):
  """Images as ``dtype`` values in {0, ..., 255}, [B, H, W, C]: the input convention of
  ``FlowModel.call`` (and so of ``model(images)`` and ``predict``).

  images: uint8, or any integer or float tensor holding whole pixel values in [0, 255]. Values
  outside it (floats scaled to [0, 1], negative or fractional values) raise ValueError naming
  their range eagerly, and fail a graph (``predict``) with InvalidArgumentError saying the
  same; an XLA-compiled function skips the graph check (XLA has no assertions)."""
  images = tf.convert_to_tensor(images)
  if images.dtype == tf.uint8:
    return tf.cast(images, dtype)
  if not (images.dtype.is_integer or images.dtype.is_floating):
    raise ValueError(f'Expected uint8 images [batch, H, W, C], got dtype {images.dtype.name}.')
  whole = (images >= 0) & (images <= 255)
  if images.dtype.is_floating:
    whole &= tf.equal(tf.floor(images), images)
  problem = (f'Expected uint8 images, or {images.dtype.name} values holding whole pixel values '
             'in [0, 255]')
  advice = ('images scaled to [0, 1] must be scaled back (np.round(x * 255).astype(np.uint8)); '
            'for dequantized values in [0, 256) use model.distribution.log_prob')
  if tf.executing_eagerly():
    if not bool(tf.reduce_all(whole)):
      low, high = float(tf.reduce_min(images)), float(tf.reduce_max(images))
      raise ValueError(f'{problem}, got values in [{low:g}, {high:g}]'
                       f'{"" if images.dtype.is_integer else " (not all whole numbers)"}: '
                       f'{advice}.')
  else:
    tf.debugging.Assert(tf.reduce_all(whole),
                        [f'{problem}, got values in', tf.reduce_min(images),
                         tf.reduce_max(images), f': {advice}.'])
  return tf.cast(images, dtype)


def _sample_seed(seed):
  """The int32 [] seed of a draw: ``seed`` checked, or a fresh one from TensorFlow's global
  generator for None. Raises ValueError for anything but an integer in the int32 range."""
  if seed is None:
    return tf.random.uniform([], maxval=np.iinfo(np.int32).max, dtype=tf.int32)
  value = np.asarray(seed)
  if (value.shape != () or not np.issubdtype(value.dtype, np.integer)
      or not np.iinfo(np.int32).min <= int(value) <= np.iinfo(np.int32).max):
    raise ValueError(f'seed must be None or an integer in the int32 range (the seed of the '
                     f'served sample signature), got {seed!r}.')
  return tf.constant(int(value), tf.int32)


def _split_seeds(seed, num, seed_generator):
  """num stateless seeds derived from one [2] seed or from [B, 2] per-image seeds (each image
  keeps streams of its own), or the SeedGenerator num times."""
  if seed is None:
    return [seed_generator] * num
  seed = tf.cast(seed, tf.int32)
  if seed.shape.rank == 2:
    return [random.fold_in(seed, i) for i in range(num)]
  return [seed + tf.constant([0, 7919 * i], tf.int32) for i in range(num)]


# Why samples at a high temperature are NaN or Inf in a working model (said instead of "broken").
TEMPERATURE_OVERFLOW = ('the samples overflowed: a temperature above 1 scales the latents by '
                        'it, beyond what the flow inverts in finite numbers; lower the '
                        'temperature (the papers sample at 1 or below)')


def check_sample_overflow(values, temperature, what):
  """values, or an error naming the temperature if they hold NaN or Inf at a temperature above 1
  (NonFiniteError eagerly; in a graph an InvalidArgumentError that prints the temperature): a
  working model's samples overflow at a high enough temperature. At a temperature <= 1 this
  passes them on, for ``check_finite`` to refuse as a broken model's."""
  if tf.executing_eagerly():
    if float(temperature) > 1 and not np.all(np.isfinite(values)):
      raise NonFiniteError(f'{what}: {TEMPERATURE_OVERFLOW}')
    return values
  overflow = tf.debugging.Assert(
      tf.reduce_all(tf.math.is_finite(values)) | (temperature <= 1.),
      [f'{what} at temperature', temperature, f': {TEMPERATURE_OVERFLOW}'])
  with tf.control_dependencies([overflow]):
    return tf.identity(values)


def check_temperature(temperature):
  """Raises ValueError unless temperature is a finite number >= 0 (an infinite temperature
  scales the prior's noise to infinity: every sample would be NaN)."""
  t = float(temperature)
  if not math.isfinite(t) or t < 0:
    raise ValueError(f'temperature must be a finite number >= 0, got {temperature}.')
  return t


def check_finite(values, what):
  """values, or NonFiniteError (eager) / InvalidArgumentError (in a graph) naming `what` if
  they hold NaN or Inf."""
  if not tf.executing_eagerly():
    return tf.debugging.check_numerics(values, f'{what}: the model produced NaN or Inf values')
  bad = ~np.isfinite(np.asarray(values))
  if bad.any():
    rows = int(np.any(bad.reshape(bad.shape[0], -1), axis=1).sum()) if bad.ndim > 1 else 1
    raise NonFiniteError(f'{what}: {rows} of {bad.shape[0]} images hold NaN or Inf values '
                         f'({int(bad.sum())} of {bad.size} values): the model gives non-finite '
                         'outputs, so no images are returned (a model that produces them is '
                         'broken: check the checkpoint it was restored from).')
  return values


def to_images(values):
  """Dequantized values in [0, 256) -> uint8 images (floor, clipped)."""
  return tf.cast(tf.clip_by_value(tf.floor(values), 0., 255.), tf.uint8)


def _images_of(data):
  """The images of one dataset element: the element itself, the first entry of an
  (images, ...) tuple, or the 'image' entry of a dict (what ``tfds.load`` gives; labels and
  other entries are ignored), also as the first entry of a tuple ((dict, labels) elements)."""
  if isinstance(data, (tuple, list)):
    data = data[0]
  if isinstance(data, dict):
    if 'image' not in data:
      raise ValueError(f"Expected the images under the key 'image' of a dict element (as "
                       f'tfds.load gives them), got the keys {sorted(data)}; map the dataset to '
                       "images first, e.g. ds.map(lambda d: d['my_key']).")
    return data['image']
  return data


def _first_batch(x, batch_size=None):
  """The first batch of images that ``fit`` would see, for the initialisation pass."""
  if isinstance(x, tf.data.Dataset):
    return _images_of(next(iter(x)))
  if isinstance(x, dict):
    x = _images_of(x)
  if isinstance(x, (np.ndarray, tf.Tensor)):
    return x[:batch_size or 32]
  raise ValueError(f'fit cannot take the initialisation batch from a {type(x).__name__}: call '
                   'model.initialize(images) with a batch of real training images first.')


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
                     'convert floats with np.round(x).astype(np.uint8) if they are pixel values. '
                     'For gradients with respect to the pixels, use model.distribution.log_prob '
                     'on dequantized float values in [0, 256) (README: "Gradients with respect '
                     'to the images").')
  if array.size and (array.min() < 0 or array.max() > 255):
    raise ValueError(f'Image values must lie in [0, 255], got range [{array.min()}, '
                     f'{array.max()}].')
  return array.astype(np.uint8)
