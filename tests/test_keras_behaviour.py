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


def _tiny_glow(**compile_settings):
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  model.compile(keras.optimizers.Adamax(1e-3), **compile_settings)
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


# -- item 1: predict and __call__ on uint8 images -------------------------------------------
def test_predict_and_call_give_the_one_sample_log_prob_of_uint8_images():
  """model(images) and model.predict(images) take uint8 images (as fit and evaluate do) and
  give the one-sample bound of log P in nats, [B]: for the same noise (the SeedGenerator's
  state) the value of the same images as whole float pixel values, and on average the
  model.log_prob figure (digits, not black images)."""
  model = _initialised_glow()
  images = _digits(8)
  state = model.seed_generator.state.numpy()
  called = model(images).numpy()
  model.seed_generator.state.assign(state)
  as_floats = model(images.astype(np.float32)).numpy()
  model.seed_generator.state.assign(state)
  predicted = model.predict(images, verbose=0)
  assert called.shape == predicted.shape == (8,)
  np.testing.assert_array_equal(called, as_floats)
  np.testing.assert_allclose(predicted, called, rtol=1e-5)
  np.testing.assert_allclose(np.mean(predicted), np.mean(model.log_prob(images).numpy()),
                             rtol=2e-3)


def test_input_outside_the_pixel_convention_is_refused_naming_it():
  """Floats scaled to [0, 1] (the silent 9.55 bits/dim of black images before) and negative
  integers are refused, eagerly with ValueError and in predict's graph with
  InvalidArgumentError, both naming the values' range."""
  model = _initialised_glow()
  scaled = _digits(4).astype(np.float32) / 255.
  with pytest.raises(ValueError, match=r'whole pixel values in \[0, 255\], got values in '
                                       r'\[0, 1\] \(not all whole numbers\)'):
    model(scaled)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'whole pixel values in \[0, 255\]'):
    model.predict(scaled, verbose=0)
  with pytest.raises(ValueError, match=r'int32 values holding whole pixel values in \[0, 255\], '
                                       r'got values in \[-1, -1\]'):
    model(-np.ones((2, 8, 8, 1), np.int32))
  with pytest.raises(ValueError, match='Expected uint8 images'):
    model(np.zeros((2, 8, 8, 1), bool))


# -- item 3: saving the whole model ---------------------------------------------------------
@pytest.mark.parametrize('family', sorted(SUMMARY_CONFIGS))
def test_keras_file_round_trip(family, tmp_path):
  """model.save('m.keras') and keras.models.load_model give the same class and config, an
  initialised model and the same weights (log_prob with a seed equal bit for bit)."""
  images = _digits(8)
  model = tfflows.build_model(tfflows.FlowConfig(**SUMMARY_CONFIGS[family]))
  model.initialize(images)
  model.save(str(tmp_path / 'm.keras'))
  loaded = keras.models.load_model(str(tmp_path / 'm.keras'))
  assert type(loaded) is type(model) and loaded.config == model.config
  assert loaded.is_initialized
  np.testing.assert_array_equal(loaded.log_prob(images[:4], seed=0).numpy(),
                                model.log_prob(images[:4], seed=0).numpy())


def test_keras_file_keeps_the_optimizer_state_and_training_goes_on(tmp_path):
  """The optimizer state and compile's training settings come back; training goes on."""
  images = _digits(16)
  model = _tiny_glow(max_grad_norm=50., scale_l2=1e-4)
  model.fit(images, batch_size=8, epochs=1, verbose=0)
  model.save(str(tmp_path / 'm.keras'))
  loaded = keras.models.load_model(str(tmp_path / 'm.keras'))
  assert (loaded.max_grad_norm, loaded.scale_l2) == (50., 1e-4)
  assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
  assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
  for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
    np.testing.assert_array_equal(restored.numpy(), saved.numpy())
  loaded.fit(images, batch_size=8, epochs=1, verbose=0)
  assert int(loaded.optimizer.iterations) == 4


def test_compile_jit_compile_is_keras_own():
  """jit_compile as Keras has it: 'auto' (the default) is Keras' choice (no XLA on a machine
  without an accelerator), True and False are kept; a model compiled without settings has none
  (no clipping, no L2 on scales)."""
  model = _tiny_glow()
  expected = bool(tf.config.list_physical_devices('GPU'))
  assert model.jit_compile is expected
  assert (model.max_grad_norm, model.scale_l2, model.replica_jit_compile) == (0., 0., False)
  for asked in (True, False):
    model.compile(keras.optimizers.Adamax(1e-3), jit_compile=asked)
    assert model.jit_compile is asked and not model.replica_jit_compile


def test_keras_file_with_the_training_settings_in_the_model_config_loads(tmp_path):
  """Files written when max_grad_norm and scale_l2 were get_config's (not compile's) load
  with them."""
  import json  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel
  model = _tiny_glow()
  model.optimizer.build(model.trainable_variables)
  model.save(str(tmp_path / 'm.keras'))
  with zipfile.ZipFile(tmp_path / 'm.keras') as saved:
    files = {name: saved.read(name) for name in saved.namelist()}
  config = json.loads(files['config.json'])
  for name in ('max_grad_norm', 'scale_l2'):
    del config['compile_config'][name]
  config['config'].update(max_grad_norm=100., scale_l2=5e-5)
  files['config.json'] = json.dumps(config).encode()
  with zipfile.ZipFile(tmp_path / 'old.keras', 'w') as old:
    for name, content in files.items():
      old.writestr(name, content)
  loaded = keras.models.load_model(str(tmp_path / 'old.keras'))
  assert (loaded.max_grad_norm, loaded.scale_l2) == (100., 5e-5)


def test_lcma_permutations_travel_inside_the_keras_file(tmp_path):
  """An LCMA model loads with its masks file gone: the permutations are in the .keras file."""
  from tfflows import lcma  # pylint: disable=import-outside-toplevel
  masks = tmp_path / 'masks.npz'
  lcma.write_masks(str(masks), np.random.RandomState(0).randn(1, 64), image_shape=(8, 8, 1))
  config = tfflows.FlowConfig(**SUMMARY_CONFIGS['realnvp'], split='lcma', lcma_masks=str(masks))
  images = _digits(8)
  model = tfflows.build_model(config)
  model.initialize(images)
  model.save(str(tmp_path / 'm.keras'))
  masks.unlink()
  loaded = keras.models.load_model(str(tmp_path / 'm.keras'))
  assert loaded.config.split == 'lcma' and loaded.config.lcma_masks != str(masks)
  np.testing.assert_array_equal(loaded.log_prob(images[:4], seed=0).numpy(),
                                model.log_prob(images[:4], seed=0).numpy())


def test_model_checkpoint_keeps_the_best_full_model_and_export_points_to_tfflows(tmp_path):
  """keras.callbacks.ModelCheckpoint('best.keras', save_best_only=True) with its default
  monitor (val_loss) writes a loadable model; Keras' generic model.export is refused with a
  message naming tfflows.export."""
  images = _digits(16)
  model = _tiny_glow()
  path = str(tmp_path / 'best.keras')
  model.fit(images, batch_size=8, epochs=2, verbose=0, validation_data=(images[:8],),
            callbacks=[keras.callbacks.ModelCheckpoint(path, save_best_only=True)])
  assert isinstance(keras.models.load_model(path), tfflows.FlowModel)
  with pytest.raises(NotImplementedError, match=r'tfflows\.export\.export_saved_model'):
    model.export(str(tmp_path / 'export'))


# -- item 4: the standard callbacks ---------------------------------------------------------
def test_loss_is_the_epoch_mean_and_internal_flags_are_not_metrics():
  """history['loss'] is the mean over the epoch's batches (not the last batch's value): with a
  zero learning rate (fixed weights), two very different batches give the mean of their
  evaluated losses; the logs hold loss, bpd and grad_norm only."""
  model = _initialised_glow()
  model.compile(keras.optimizers.Adamax(0.))
  digits, flat = _digits(8), np.full((8, 8, 8, 1), 128, np.uint8)
  per_batch = [model.evaluate(b, batch_size=8, verbose=0, return_dict=True)['loss']
               for b in (digits, flat)]
  assert abs(per_batch[0] - per_batch[1]) > 0.3  # the last batch's value is > 0.15 off
  history = model.fit(np.concatenate([digits, flat]), batch_size=8, shuffle=False, epochs=1,
                      verbose=0).history
  assert sorted(history) == ['bpd', 'grad_norm', 'loss']
  np.testing.assert_allclose(history['loss'][0], np.mean(per_batch), atol=0.05)
  np.testing.assert_allclose(history['loss'], history['bpd'])  # no regularisation here


def test_early_stopping_acts_on_its_default_val_loss():
  """EarlyStopping() monitors val_loss by default: it must stop training (here after the
  second epoch, since no epoch improves by min_delta)."""
  images = _digits(16)
  history = _tiny_glow().fit(
      images, batch_size=8, epochs=6, verbose=0, validation_data=(images[:8],),
      callbacks=[keras.callbacks.EarlyStopping(patience=1, min_delta=100.)]).history
  assert len(history['val_loss']) == 2
  assert history['val_loss'] == history['val_bpd']


def test_a_nonfinite_step_is_counted_and_terminate_on_nan_acts():
  """A NaN weight gives NaN steps: no update is applied, model.nonfinite_steps counts them and
  the epoch's loss is NaN, so keras.callbacks.TerminateOnNaN stops after the first batch."""
  model = _initialised_glow()
  model.compile(keras.optimizers.Adamax(1e-3))
  weight = model.flow_layers[0].trainable_variables[0]
  weight.assign(np.full(weight.shape, np.nan, np.float32))
  others = [v.numpy() for v in model.trainable_variables if v is not weight]
  history = model.fit(_digits(16), batch_size=8, epochs=1, verbose=0,
                      callbacks=[keras.callbacks.TerminateOnNaN()]).history
  assert model.nonfinite_steps == 1 and np.isnan(history['loss'][0])
  for before, v in zip(others, [v for v in model.trainable_variables if v is not weight]):
    np.testing.assert_array_equal(v.numpy(), before)
