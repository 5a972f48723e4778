"""FlowModel as a Keras 3 user drives it (issue 20): dataset elements in the forms Keras and
TFDS give, gradients with respect to the images, TFP's contract details."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import bijectors
import tfflows
from tfflows import data

TINY_GLOW = dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=3, width=8)


def _tiny_glow():
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  model.compile(keras.optimizers.Adamax(1e-3))
  return model


def _digits(n):
  """n embedded digits, 2x2 max-pooled and cropped to 8x8: uint8 [n, 8, 8, 1]."""
  images = data.load_embedded('train')[0][:n].astype(np.float32)
  pooled = tf.nn.max_pool2d(images, 4, 4, 'VALID').numpy()
  return pooled.astype(np.uint8)


def test_fit_and_evaluate_take_tfds_style_dict_elements():
  """{'image': uint8 [B, H, W, C], 'label': ...} elements (tfds.load's form): the images are
  trained on, the labels ignored; the result is that of the same images as plain elements."""
  images = _digits(32)
  labels = np.arange(32)
  as_dicts = tf.data.Dataset.from_tensor_slices({'image': images, 'label': labels}).batch(8)
  model = _tiny_glow()
  history = model.fit(as_dicts, epochs=1, verbose=0)
  assert np.isfinite(history.history['bpd'][-1])
  plain = tf.data.Dataset.from_tensor_slices(images).batch(8)
  state = model.seed_generator.state.numpy()  # the same noise for both evaluations
  from_dicts = model.evaluate(as_dicts, verbose=0, return_dict=True)['bpd']
  model.seed_generator.state.assign(state)
  from_images = model.evaluate(plain, verbose=0, return_dict=True)['bpd']
  np.testing.assert_allclose(from_dicts, from_images, rtol=1e-6)


def test_fit_takes_a_dict_of_arrays_and_dict_label_tuples():
  """model.fit({'image': array, 'label': ...}) on a fresh model (the initialisation batch comes
  from the 'image' entry) and ({'image': ...}, labels) elements, Keras' (x, y) form."""
  images = _digits(16)
  model = _tiny_glow()
  model.fit({'image': images, 'label': np.arange(16)}, batch_size=8, epochs=1, verbose=0)
  assert model.is_initialized
  pairs = tf.data.Dataset.from_tensor_slices(({'image': images}, np.arange(16))).batch(8)
  assert np.isfinite(model.evaluate(pairs, verbose=0, return_dict=True)['bpd'])


def test_a_dict_element_without_images_is_refused_naming_its_keys():
  ds = tf.data.Dataset.from_tensor_slices({'pixels': _digits(8), 'label': np.arange(8)}).batch(4)
  with pytest.raises(ValueError, match=r"key 'image'.*\['label', 'pixels'\]"):
    _tiny_glow().fit(ds, epochs=1, verbose=0)


def test_gradient_with_respect_to_the_images_through_the_distribution(float64):
  """The documented way (README: "Gradients with respect to the images"): a tape over
  model.distribution.log_prob of float values in [0, 256). The gradient has the images' shape
  and matches a central finite difference along a random direction; bits_per_dim refuses the
  floats with a message that points at this way."""
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  images = _digits(4)
  model.initialize(images)
  x = tf.cast(images, tf.float64) + 0.5
  with tf.GradientTape() as tape:
    tape.watch(x)
    log_p = model.distribution.log_prob(x)
  grad = tape.gradient(log_p, x)
  assert log_p.shape == [4] and grad.shape == x.shape
  assert np.all(np.isfinite(grad.numpy())) and np.max(np.abs(grad.numpy())) > 0
  direction = tf.constant(np.random.default_rng(0).normal(size=x.shape))
  h = 1e-4
  numeric = (model.distribution.log_prob(x + h * direction)
             - model.distribution.log_prob(x - h * direction)) / (2 * h)
  analytic = tf.reduce_sum(grad * direction, axis=[1, 2, 3])
  np.testing.assert_allclose(analytic.numpy(), numeric.numpy(), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='model.distribution.log_prob'):
    model.bits_per_dim(x.numpy())


def test_actnorm_declares_a_constant_jacobian():
  """TFP's rule: a log-det with no dependence on x says so (as the 1x1 convolution does). The
  log-det at two inputs is the same, and TFP returns it unbroadcast (one value a call)."""
  actnorm = bijectors.ActNorm(3)
  actnorm.params.log_scale.assign([0.1, -0.2, 0.3])
  assert actnorm.is_constant_jacobian
  x1, x2 = (tf.random.normal([2, 4, 4, 3], seed=s) for s in (1, 2))
  ldj1 = actnorm.forward_log_det_jacobian(x1, event_ndims=3)
  ldj2 = actnorm.forward_log_det_jacobian(x2, event_ndims=3)
  np.testing.assert_allclose(ldj1, ldj2)
  np.testing.assert_allclose(np.broadcast_to(ldj1, [2]), 16 * 0.2, rtol=1e-6)


def _initialised_glow():
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  model.initialize(_digits(8))
  return model


def test_empty_batches_give_empty_results_in_python_and_served(tmp_path):
  """log_prob / bits_per_dim of [0, H, W, C] images are [0] results (the bound and the IW
  estimate, seeded or not), in Python and through the served signature."""
  from tfflows import export  # pylint: disable=import-outside-toplevel
  model = _initialised_glow()
  empty = np.zeros((0, 8, 8, 1), np.uint8)
  for kwargs in ({}, {'seed': 0}, {'num_samples': 3}, {'num_samples': 3, 'seed': 1}):
    assert model.log_prob(empty, **kwargs).shape == [0]
    assert model.bits_per_dim(empty, **kwargs).shape == [0]
  loaded, _ = export.load_exported(export.export_saved_model(model, tmp_path / '1'))
  served = loaded.signatures['serving_default'](images=tf.constant(empty))
  assert served['log_prob'].shape == [0] and served['bits_per_dim'].shape == [0]
  images = _digits(2)  # and a non-empty batch still gives the Python numbers
  np.testing.assert_array_equal(export.serve_log_prob(loaded, images)['log_prob'],
                                model.log_prob(images, seed=0).numpy())


def test_a_temperature_whose_samples_overflow_is_named(tmp_path):
  """At temperature 1e6 a trained model's samples overflow: refused with a message naming the
  temperature (not "a broken model"), in Python and through the served signature, while
  temperature 1 samples."""
  from tfflows import export  # pylint: disable=import-outside-toplevel
  from tfflows.models.flow_model import NonFiniteError  # pylint: disable=import-outside-toplevel
  model = _tiny_glow()
  model.fit(_digits(64), epochs=2, batch_size=16, verbose=0)  # (untrained, it overflows at 1e37)
  assert model.sample(2, temperature=1.0, seed=0).shape == (2, 8, 8, 1)
  with pytest.raises(NonFiniteError, match=r'temperature=1000000.0\): the samples overflowed'):
    model.sample(2, temperature=1e6, seed=0)
  loaded, _ = export.load_exported(export.export_saved_model(model, tmp_path / '1'))
  sample = loaded.signatures['sample']
  assert sample(num_samples=tf.constant(2), temperature=tf.constant(1.),
                seed=tf.constant(0))['images'].shape == (2, 8, 8, 1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'(?s)sample at temperature.*1e\+06.*the samples overflowed'):
    sample(num_samples=tf.constant(2), temperature=tf.constant(1e6), seed=tf.constant(0))


SUMMARY_CONFIGS = {
    'glow': TINY_GLOW,
    'realnvp': dict(model='realnvp', image_shape=(8, 8, 1), num_scales=2, res_blocks=1,
                    base_width=4),
    'marscf': dict(model='marscf', image_shape=(8, 8, 1), num_levels=2, steps_per_level=2,
                   width=8),
    'denseflow': dict(model='denseflow', image_shape=(8, 8, 1), block_conf=(1, 1),
                      layers_conf=(1, 1), layer_mid_channels=(8, 8), growth_rate=2,
                      dense_layers=1, dense_growth=4, num_landmarks=2),
}


@pytest.mark.parametrize('family', sorted(SUMMARY_CONFIGS))
def test_summary_counts_every_layer(family):
  """model.summary() lists a parameter count for every layer (none '(unbuilt)'), and the
  counts of the model's layers add up to the total."""
  model = tfflows.build_model(tfflows.FlowConfig(**SUMMARY_CONFIGS[family]))
  assert all(layer.built for layer in model._flatten_layers())  # pylint: disable=protected-access
  assert sum(layer.count_params() for layer in model.layers) == model.count_params()
  lines = []
  model.summary(print_fn=lambda line, **unused: lines.append(line))
  assert 'unbuilt' not in '\n'.join(lines)
