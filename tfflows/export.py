"""SavedModel export for TF Serving, and loading it back.

    export_saved_model(model, 'workdir/export/1')     # TF Serving wants a numeric version dir
    loaded, config = load_exported('workdir/export/1')
    loaded.signatures['serving_default'](images=uint8_batch)   # {'log_prob', 'bits_per_dim'}
    loaded.signatures['sample'](num_samples=..., temperature=..., seed=...)  # {'images'}

Signatures (a public contract; docs/serving.md):

``serving_default``  images uint8 [None, H, W, C] -> log_prob float32 [None] (nats),
                     bits_per_dim float32 [None].
                     The dequantization (and augmentation) noise of each image is drawn from a
                     stateless seed folded from that image's pixels and the fixed serving seed
                     0 (``tfflows.random.example_seeds``), so a served number is a function of
                     the image alone: the same alone, anywhere in a batch of any size, and
                     under TF Serving's request batching. It equals ``model.log_prob(images,
                     num_samples=k, seed=0)`` bit for bit: both run the same ops in a non-XLA
                     ``tf.function`` (neither path is jit-compiled). k is
                     ``num_importance_samples`` given at export (1: the training bound).
``sample``           num_samples int32 [], temperature float32 [], seed int32 [] ->
                     images uint8 [None, H, W, C], equal to ``model.sample(n, temperature,
                     seed)`` for the same arguments.
``ood``              images uint8 [None, H, W, C] -> bits_per_dim float32 [None] (the
                     serving_default number), complexity_bits_per_dim float32 [None] (8 times
                     the PNG length over D) and score float32 [None] (bits_per_dim -
                     complexity_bits_per_dim; larger: more out-of-distribution), equal to
                     ``tfflows.ood.scores(model, images, k)``; see ``tfflows/ood.py``.
``typicality``       (only when the export has typicality statistics) images uint8
                     [M, H, W, C] -> batch_bits_per_dim float64 [] (the batch's mean),
                     distance float64 [] (|mean - H_hat|), epsilon float64 [] and
                     is_out_of_distribution bool [] (distance > epsilon): the batch test of
                     ``tfflows.ood.typicality_test``. A batch of another size than M fails.

No signature turns a NaN into a number or a pixel silently: a NaN or Inf log_prob, or a
sample with NaN or Inf values, fails the call (InvalidArgumentError from
``tf.debugging.check_numerics``, TF Serving answers with that error), and so do a NaN or infinite
temperature and a negative one.

Files: ``export_dir`` is a plain SavedModel (saved_model.pb, variables/) whose ``assets/``
holds ``config.json`` (``model.config.to_json()``) as a ``tf.saved_model.Asset``: TF tooling
(saved_model_cli, TF Serving, copies through tf.io.gfile) treats it as part of the model, and
the loaded object exposes its path as ``loaded.config_file``. With typicality statistics,
``assets/typicality.json`` (``TypicalityStatistics.to_json()``) travels the same way
(``loaded.typicality_file``; ``load_typicality(export_dir)`` reads it). ``assets.extra/
tf_serving_warmup_requests`` holds warm-up requests of every signature (``tfflows/
serving_warmup.py``) that TF Serving replays before the first client. The export is written
into a temporary sibling directory and renamed into place, so a crash leaves no half-written
export.
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from tfflows import atomic
from tfflows import ood
from tfflows import random
from tfflows import serving_warmup
from tfflows.config import FlowConfig
from tfflows.models.flow_model import (NonFiniteError, check_sample_overflow, refuse_non_finite,
                                     to_images)

CONFIG_NAME = 'config.json'
TYPICALITY_NAME = ood.TYPICALITY_NAME
SERVING_SEED = ood.SERVING_SEED  # the stateless seed of the served log-likelihood's noise


class FlowServingModule(tf.Module):
  """What the SavedModel holds: the Keras model, its config (and typicality) asset and the
  signatures."""

  def __init__(self, model, config_path, num_importance_samples=1, typicality=None,
               typicality_path=None):
    super().__init__(name='tfflows_serving')
    # The module holds the Keras model without tracking it and tracks the tf.Variables under
    # its Keras variables instead. Tracking the Keras model itself gives a SavedModel that
    # tf.saved_model.load reads but the TF1 session loader of TF Serving and `saved_model_cli
    # run` does not ("Could not find variable ... Resource ... does not exist"; Keras issues
    # 19274, 20095); tracking both would store every weight twice.
    object.__setattr__(self, 'model', model)
    self.model_variables = [getattr(v, 'value', v) for v in model.variables]
    self.config_file = tf.saved_model.Asset(config_path)
    self.num_importance_samples = int(num_importance_samples)
    height, width, channels = model.image_shape
    self.log_prob = tf.function(self._log_prob, input_signature=[
        tf.TensorSpec([None, height, width, channels], tf.uint8, name='images')])
    self.sample = tf.function(self._sample, input_signature=[
        tf.TensorSpec([], tf.int32, name='num_samples'),
        tf.TensorSpec([], tf.float32, name='temperature'),
        tf.TensorSpec([], tf.int32, name='seed')])
    self.ood = tf.function(self._ood, input_signature=[
        tf.TensorSpec([None, height, width, channels], tf.uint8, name='images')])
    self.typicality_stats = typicality
    if typicality is not None:
      self.typicality_file = tf.saved_model.Asset(typicality_path)
      self.typicality = tf.function(self._typicality, input_signature=[
          tf.TensorSpec([None, height, width, channels], tf.uint8, name='images')])

  def signatures(self):
    """{signature name: concrete function} of the SavedModel."""
    signatures = {'serving_default': self.log_prob, 'sample': self.sample, 'ood': self.ood}
    if self.typicality_stats is not None:
      signatures['typicality'] = self.typicality
    return signatures

  def _log_prob(self, images):
    """The body of ``model.log_prob(images, k, seed=SERVING_SEED)`` with a tensor seed."""
    # A loaded signature checks the dtype of its inputs but not their shape: check at run time
    # ("Shape of tensor images [2,4,8,1] is not compatible with expected shape [?,8,8,1].").
    images = tf.ensure_shape(images, (None,) + tuple(self.model.image_shape), name='images')
    values = self.model.check_images(images)
    seed = random.stateless_seed(tf.constant(SERVING_SEED, tf.int32))
    log_prob = self.model.estimate_log_prob(values, self.num_importance_samples, seed)
    bits_per_dim = self.model.to_bits_per_dim(log_prob)
    return {'log_prob': _refuse_non_finite(log_prob, 'log_prob'),
            'bits_per_dim': _refuse_non_finite(bits_per_dim, 'bits_per_dim')}

  def _ood(self, images):
    """serving_default's bits_per_dim, the PNG complexity and the corrected score
    (``tfflows.ood``), all float32 [B] in bits/dim."""
    bits_per_dim = self._log_prob(images)['bits_per_dim']
    complexity = ood.complexity_bits_per_dim(
        tf.ensure_shape(images, (None,) + tuple(self.model.image_shape)))
    return {'bits_per_dim': bits_per_dim, 'complexity_bits_per_dim': complexity,
            'score': ood.score(bits_per_dim, complexity)}

  def _typicality(self, images):
    """The typicality test of one batch of exactly M images (``tfflows.ood``)."""
    stats = self.typicality_stats
    batch = tf.shape(images)[0]
    check = tf.debugging.assert_equal(
        batch, tf.constant(stats.batch_size, batch.dtype),
        message=f'typicality: the test takes batches of exactly M = {stats.batch_size} images '
        '(the M its threshold was estimated for); got a batch of another size')
    with tf.control_dependencies([check]):
      images = tf.identity(images)
    bits_per_dim = tf.cast(self._log_prob(images)['bits_per_dim'], tf.float64)
    mean = tf.reduce_mean(bits_per_dim)
    distance = tf.abs(mean - tf.constant(stats.train_bits_per_dim, tf.float64))
    epsilon = tf.constant(stats.epsilon, tf.float64)
    return {'batch_bits_per_dim': mean, 'distance': distance, 'epsilon': epsilon,
            'is_out_of_distribution': distance > epsilon}

  def _sample(self, num_samples, temperature, seed):
    """The body of ``model.sample(n, temperature, seed)`` with tensor arguments."""
    num_samples = tf.ensure_shape(num_samples, [], name='num_samples')
    temperature = tf.ensure_shape(temperature, [], name='temperature')
    seed = tf.ensure_shape(seed, [], name='seed')
    checks = [
        tf.debugging.assert_positive(num_samples, message='num_samples must be >= 1'),
        tf.debugging.assert_non_negative(temperature, message='temperature must be >= 0'),
        tf.debugging.assert_all_finite(temperature, 'temperature must be finite'),
    ]
    with tf.control_dependencies(checks):
      num_samples = tf.identity(num_samples)
    values = check_sample_overflow(self.model.sample_values(num_samples, temperature, seed),
                                   temperature, 'sample')
    return {'images': to_images(_refuse_non_finite(values, 'sample'))}


def _refuse_non_finite(values, name):
  """values, failing the served call if they hold NaN or Inf (a broken model)."""
  return tf.debugging.check_numerics(
      values, f'{name}: the model produced NaN or Inf values (a broken model); refusing to '
      'serve them')


def export_saved_model(model, export_dir, num_importance_samples=1, overwrite=False,
                       check_images=None, typicality=None, warmup=True):
  """Writes ``model`` as a SavedModel with the ``serving_default``, ``sample`` and ``ood``
  signatures (and ``typicality`` when ``typicality`` is given).

  model: a built ``FlowModel`` (train or restore it first: ActNorm initialises in training).
  export_dir: the SavedModel directory; for TF Serving make its last component a
  version number, e.g. ``workdir/export/1`` (see ``next_version_dir``).
  num_importance_samples: k of the served log_prob (1: the one-sample bound; k > 1: the
  k-sample importance-weighted estimate, k times the compute).
  overwrite: replace an existing export_dir (otherwise it is an error).
  check_images: optional uint8 images [B, H, W, C]; the model's served log_prob of them must be
  finite, else NonFiniteError and nothing is written (a broken model is not exported). The
  warm-up requests use the first 8 of them (zero images when none are given).
  typicality: optional ``tfflows.ood.TypicalityStatistics`` of this model's served bits/dim
  (its num_importance_samples must be this export's): written as assets/typicality.json, and
  the ``typicality`` signature is added.
  warmup: write assets.extra/tf_serving_warmup_requests (``tfflows.serving_warmup``): 2
  requests of each signature (1 and 8 images; 1 and 4 samples at temperature 0; one batch of
  M images for ``typicality``).
  Returns export_dir. Raises atomic.WriteError ('cannot write EXPORT_DIR: reason') when the
  directory cannot be written; nothing is then left behind.
  """
  if int(num_importance_samples) < 1:
    raise ValueError(f'num_importance_samples must be >= 1, got {num_importance_samples}.')
  _check_initialised(model)
  if typicality is not None:
    if not isinstance(typicality, ood.TypicalityStatistics):
      raise TypeError(f'typicality must be a tfflows.ood.TypicalityStatistics, got '
                      f'{type(typicality).__name__}.')
    if typicality.num_importance_samples != int(num_importance_samples):
      raise ValueError(f'the typicality statistics are of bits/dim with k = '
                       f'{typicality.num_importance_samples}, the export serves k = '
                       f'{num_importance_samples}.')
  if check_images is not None:
    check_finite_log_prob(model, check_images, num_importance_samples)
  requests = (_warmup_requests(model, check_images, typicality, num_importance_samples)
              if warmup else [])
  export_dir = os.path.abspath(os.fspath(export_dir))
  if os.path.exists(export_dir) and not overwrite:
    raise FileExistsError(f'{export_dir} exists; pass overwrite=True to replace it or export to '
                          'a new version directory.')
  parent = os.path.dirname(export_dir)
  base = os.path.basename(export_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=parent)
  except OSError as error:
    raise atomic.write_error(export_dir, error) from None
  try:
    config_dir = os.path.join(staging, 'config')
    os.makedirs(config_dir)
    config_path = os.path.join(config_dir, CONFIG_NAME)
    with open(config_path, 'w', encoding='utf-8') as f:
      f.write(model.config.to_json())
    typicality_path = None
    if typicality is not None:
      typicality_dir = os.path.join(staging, 'typicality')
      os.makedirs(typicality_dir)
      typicality_path = os.path.join(typicality_dir, TYPICALITY_NAME)
      with open(typicality_path, 'w', encoding='utf-8') as f:
        f.write(typicality.to_json())
    module = FlowServingModule(model, config_path, num_importance_samples, typicality,
                               typicality_path)
    saved = os.path.join(staging, 'saved_model')
    tf.saved_model.save(module, saved, signatures=module.signatures())
    if requests:
      serving_warmup.write_warmup_requests(
          os.path.join(saved, serving_warmup.WARMUP_PATH), requests)
    _replace_dir(saved, export_dir, staging)
  except (OSError, tf.errors.OpError) as error:
    raise atomic.write_error(export_dir, error) from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return export_dir


def _warmup_requests(model, check_images, typicality, num_importance_samples):
  """[(signature, inputs)] replayed by TF Serving at load: 2 requests of each signature. Each
  is checked here first (a warm-up request that fails makes TF Serving refuse to load the
  model): the images' log_prob must be finite, the samples (temperature 0) too."""
  if check_images is not None and len(check_images):
    images = np.asarray(check_images, np.uint8)[:8]
  else:
    images = np.zeros((8,) + tuple(model.image_shape), np.uint8)
    check_finite_log_prob(model, images, num_importance_samples)
  batches = [images[:1], images]
  requests = [('serving_default', {'images': b}) for b in batches]
  requests += [('ood', {'images': b}) for b in batches]
  for n, seed in ((1, 0), (4, 1)):
    try:
      model.sample(n, temperature=0., seed=seed)
    except (NonFiniteError, ValueError) as error:
      raise NonFiniteError(f'the warm-up sample request (n={n}, temperature 0) fails: {error} '
                           'TF Serving would not load this model, so it is not exported.') from None
    requests.append(('sample', {'num_samples': np.int32(n), 'temperature': np.float32(0.),
                                'seed': np.int32(seed)}))
  if typicality is not None:
    reps = -(-typicality.batch_size // len(images))
    requests.append(('typicality', {'images': np.concatenate([images] * reps)[
        :typicality.batch_size]}))
  return requests


def check_finite_log_prob(model, images, num_importance_samples):
  """NonFiniteError unless the model's served log_prob of ``images`` is finite."""
  refuse_non_finite(model.log_prob(images, num_importance_samples, seed=SERVING_SEED),
                    'export: the log_prob of the check images', 'so it is not exported')


def _check_initialised(model):
  """Refuses a model whose ActNorm layers have not seen data: an export of an untrained model
  is almost certainly a mistake (its ActNorms are the identity)."""
  from bijectors.actnorm import actnorm_state  # pylint: disable=import-outside-toplevel
  fresh, _ = actnorm_state(model)
  if fresh:
    raise ValueError(f'{fresh} ActNorm layers are not initialised: train the model or restore a '
                     'checkpoint before exporting it.')


def _replace_dir(source, target, staging):
  """Renames the finished export into place; an old target is moved aside first and deleted
  only once the new one is in place."""
  if os.path.exists(target):
    old = os.path.join(staging, 'old')
    os.rename(target, old)
    try:
      os.rename(source, target)
    except BaseException:
      os.rename(old, target)
      raise
  else:
    os.rename(source, target)


def next_version_dir(base_dir):
  """``base_dir/<n+1>`` where n is the largest numeric subdirectory (0 if none): the layout TF
  Serving watches (it serves the highest version)."""
  base_dir = os.fspath(base_dir)
  versions = [int(name) for name in (os.listdir(base_dir) if os.path.isdir(base_dir) else [])
              if name.isdigit()]
  return os.path.join(base_dir, str(max(versions, default=0) + 1))


def load_exported(export_dir):
  """Loads an export: returns (loaded object, FlowConfig).

  ``loaded.signatures['serving_default']`` and ``loaded.signatures['sample']`` are the served
  functions (keyword arguments, dict results); ``loaded.log_prob(images)`` and
  ``loaded.sample(num_samples, temperature, seed)`` are the same functions called directly.
  Inputs of the wrong dtype or shape are refused (see ``check_signature_input``).
  """
  export_dir = os.fspath(export_dir)
  if not tf.saved_model.contains_saved_model(export_dir):
    raise FileNotFoundError(f'No SavedModel in {export_dir} (expected saved_model.pb there; '
                            'TF Serving exports live in a numeric version subdirectory).')
  loaded = tf.saved_model.load(export_dir)
  config_path = os.path.join(export_dir, 'assets', CONFIG_NAME)
  if hasattr(loaded, 'config_file'):
    config_path = loaded.config_file.asset_path.numpy().decode()
  with open(config_path, encoding='utf-8') as f:
    config = FlowConfig.from_json(f.read())
  return loaded, config


def load_typicality(export_dir):
  """The ``tfflows.ood.TypicalityStatistics`` of an export, or None if it has none."""
  path = os.path.join(os.fspath(export_dir), 'assets', TYPICALITY_NAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return ood.TypicalityStatistics.from_json(f.read())


def serve_log_prob(loaded, images):
  """Calls ``serving_default`` of a loaded export with a checked uint8 batch; returns numpy
  {'log_prob', 'bits_per_dim'}. Raises ValueError naming a wrong dtype or shape before TF does."""
  images = check_signature_input(loaded.signatures['serving_default'], 'images', images)
  return {k: v.numpy() for k, v in loaded.signatures['serving_default'](images=images).items()}


def check_signature_input(signature, name, value):
  """Converts ``value`` for input ``name`` of a (loaded) signature, or raises a ValueError that
  names the expected and the given dtype and shape. (A raw signature call also refuses such
  input, with TensorFlow's message; this one is clearer and does not cast silently.)"""
  spec = signature.structured_input_signature[1][name]
  array = np.asarray(value)
  if array.dtype != spec.dtype.as_numpy_dtype:
    raise ValueError(f'Input {name!r} must have dtype {spec.dtype.name} and shape '
                     f'{_shape_str(spec.shape)}, got dtype {array.dtype}.')
  if not spec.shape.is_compatible_with(array.shape):
    raise ValueError(f'Input {name!r} must have shape {_shape_str(spec.shape)}, got '
                     f'{list(array.shape)}.')
  return tf.constant(array)


def _shape_str(shape):
  return '[' + ', '.join('None' if d is None else str(d) for d in shape.as_list()) + ']'
