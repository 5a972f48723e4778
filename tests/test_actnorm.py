import keras
import numpy as np
import pytest
import tensorflow as tf

import tfflows
from bijectors import actnorm
from bijectors.actnorm import ActNorm
from tests import flow_checks

TINY_GLOW = dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=2, width=8)


def _initialised(b, x):
  with actnorm.data_initialization():
    return b.forward_and_log_det(x)


def test_data_dependent_init_normalises_first_batch():
  b = ActNorm(3)
  x = tf.random.normal([16, 4, 4, 3]) * 3. + 2.
  y, _ = _initialised(b, x)
  np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2)), 0., atol=1e-5)
  np.testing.assert_allclose(np.std(y, axis=(0, 1, 2)), 1., atol=1e-4)
  assert float(b.params.initialized.numpy()) == 1.
  # A second initialisation pass does not re-initialise.
  loc = b.params.loc.numpy().copy()
  _initialised(b, x * 5.)
  np.testing.assert_array_equal(b.params.loc.numpy(), loc)


def test_outside_training_never_changes_weights():
  """Inference (any call outside data_initialization) leaves an uninitialised ActNorm the
  identity and its weights untouched, eagerly and under tf.function."""
  b = ActNorm(2)
  x = tf.random.normal([4, 2, 2, 2]) * 5. + 3.
  for fn in (b.forward_and_log_det, tf.function(b.forward_and_log_det)):
    y, log_det = fn(x)
    np.testing.assert_array_equal(y, x)
    assert float(log_det) == 0.
  assert float(b.params.initialized.numpy()) == 0.
  assert not np.any(b.params.log_scale.numpy())


def test_init_under_tf_function_and_stateless_scope():
  """The initialisation is a plain assignment (no tf.cond), so it works in a tf.function and a
  keras.StatelessScope records it (the looped steps rely on that)."""
  x = tf.random.normal([8, 2, 2, 2]) * 2. + 1.
  b = ActNorm(2)
  with actnorm.data_initialization():
    tf.function(b.forward_and_log_det)(x)
  expected = -np.log(np.std(x.numpy(), axis=(0, 1, 2)))
  np.testing.assert_allclose(b.params.log_scale.numpy(), expected, rtol=1e-5)
  c = ActNorm(2)
  mapping = [(v, tf.convert_to_tensor(v)) for v in c.params.weights]
  with keras.StatelessScope(mapping) as scope, actnorm.data_initialization():
    c.forward_and_log_det(x)
  assert float(c.params.initialized.numpy()) == 0.  # the variables themselves are untouched
  np.testing.assert_allclose(scope.get_current_value(c.params.log_scale), expected, rtol=1e-5)
  assert float(scope.get_current_value(c.params.initialized)) == 1.


def test_constant_channel_is_only_centred():
  """A channel whose spread is below MIN_STD (an all-black batch: dequantization noise only)
  is centred but not scaled, instead of being scaled by 1 / spread."""
  noise = tf.random.uniform([16, 4, 4, 1]) / 256.          # std 1.1e-3 < MIN_STD
  x = tf.concat([noise - 0.5, tf.random.normal([16, 4, 4, 1])], axis=-1)
  b = ActNorm(2)
  _initialised(b, x)
  log_scale = b.params.log_scale.numpy()
  assert log_scale[0] == 0. and abs(log_scale[1]) < 0.2
  np.testing.assert_allclose(b.params.loc.numpy()[0], -np.mean(x.numpy()[..., 0]), rtol=1e-6)
  assert b.params.actnorm_state() == (0, 1)


def test_invertible_and_log_det(float64):
  b = ActNorm(2)
  x = tf.random.normal([3, 2, 3, 2], dtype=tf.float64) * 2. + 1.
  _initialised(b, x)
  assert abs(float(b.params.log_scale.numpy().sum())) > 0.1
  flow_checks.assert_invertible(b, x)
  flow_checks.assert_log_det_matches_jacobian(b, x)


@pytest.mark.parametrize('jit_compile', [False, True])
def test_unknown_batch(jit_compile):
  b = ActNorm(3)
  x = tf.random.normal([5, 4, 4, 3])
  _initialised(b, x)
  flow_checks.assert_unknown_batch(b, x, jit_compile)


def _digits(n, offset=0):
  from tfflows.data import embedded  # pylint: disable=import-outside-toplevel
  images = embedded.load_embedded('train')[0][offset:offset + n]
  return np.ascontiguousarray(images[:, 2::4, 2::4])  # 32x32 -> 8x8


def test_model_inference_does_not_initialise():
  """log_prob, encode and decode on a fresh model change no weight (the README example that
  scored zeros used to initialise every ActNorm from a constant batch)."""
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  before = [v.numpy().copy() for v in model.variables]
  zeros = np.zeros([4, 8, 8, 1], np.uint8)
  model.log_prob(zeros)
  model.decode(model.encode(zeros))
  assert not model.is_initialized
  for v, b in zip(model.variables, before):
    if 'seed_generator' not in v.path:
      np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)


def test_fit_initialises_on_first_batch_and_black_batch_is_harmless():
  """fit on an uninitialised model initialises ActNorm on its first batch. An all-black first
  batch centres the constant channels without the ~900x scale (log-scale 6.8) that used to
  wreck training: the model then trains like one whose ActNorms start as the identity."""
  real, test = _digits(64), _digits(64, offset=1000)
  results = {}
  for name in ('black', 'identity'):
    keras.utils.set_random_seed(3)
    model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
    model.compile(keras.optimizers.Adam(2e-3), jit_compile=False)
    if name == 'black':
      assert model.initialize(np.zeros_like(real[:16])) > 0
      assert max(float(np.max(np.abs(v.numpy()))) for v in model.variables
                 if v.path.endswith('log_scale')) == 0.
    else:
      for layer in model._flatten_layers():  # pylint: disable=protected-access
        if isinstance(layer, actnorm.ActNormParams):
          layer.initialized.assign(1.)
    assert model.is_initialized
    model.fit(real, epochs=3, batch_size=16, verbose=0)
    results[name] = float(np.mean(model.bits_per_dim(test, seed=0)))
  assert results['black'] < results['identity'] + 0.3, results
  fresh = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  fresh.compile(keras.optimizers.Adam(1e-3), jit_compile=False)
  fresh.fit(real[:16], epochs=1, batch_size=16, verbose=0)
  assert fresh.is_initialized and fresh.initialize(real[:16]) == 0
