"""Glow and RealNVP: the public contract and the mathematics of the whole model."""

import numpy as np
import pytest
import tensorflow as tf

import tfflows
from tfflows.distributions import joint
from tests import flow_checks

# Glow's 3 steps a level and RealNVP's 3-4 couplings a group run as tf.while_loop over stacked
# weights (bijectors.repeated).
TINY = {
    'glow': dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=3, width=8),
    'realnvp': dict(model='realnvp', image_shape=(8, 8, 1), num_scales=2, res_blocks=1,
                    base_width=4),
}


def _images(n=4, shape=(8, 8, 1), seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


def _trained_once(model, images):
  """Initialises ActNorm and moves every zero-initialised weight off zero with one SGD step."""
  import keras
  model.compile(keras.optimizers.SGD(1e-2))
  model.fit(images, epochs=1, batch_size=len(images), verbose=0)
  return model


@pytest.fixture(params=sorted(TINY))
def tiny(request):
  return tfflows.build_model(tfflows.FlowConfig(**TINY[request.param]))


@pytest.fixture(scope='module', params=sorted(TINY))
def trained(request):
  """A tiny model after one SGD step, shared by the read-only tests of this module."""
  return _trained_once(tfflows.build_model(tfflows.FlowConfig(**TINY[request.param])),
                       _images())


def test_log_prob_matches_tfp_distribution(trained):
  """The training path (contexts from the forward pass) equals TFP's TransformedDistribution
  over the JointDistributionCoroutine prior (which inverts each level)."""
  images = _images()
  values = tf.cast(images, tf.float32) + 0.5
  fast = trained.log_weight(tf.cast(images, tf.float32), midpoint=True)
  exact = trained.distribution.log_prob(values)
  np.testing.assert_allclose(fast, exact, rtol=1e-5, atol=1e-3)


def test_log_det_matches_autodiff_jacobian(trained):
  """log_prob = prior log-density of the encoded latents + log|det J| with J from autodiff."""
  images = _images(n=2)
  values = tf.cast(images, tf.float32) + 0.5
  latents, contexts, log_det = trained.flow.encode(values)
  for b in range(2):
    jac = flow_checks.autodiff_jacobian(lambda xb: trained.flow.encode(xb)[0], values[b:b + 1])
    _, logabsdet = np.linalg.slogdet(jac.astype(np.float64))
    np.testing.assert_allclose(log_det[b], logabsdet, rtol=1e-4, atol=2e-2)
  prior = joint.prior_log_prob(trained.priors, latents, contexts)
  np.testing.assert_allclose(trained.log_weight(tf.cast(images, tf.float32), midpoint=True),
                             prior + log_det, rtol=1e-6, atol=1e-3)


def test_decode_inverts_encode(trained):
  images = _images()
  np.testing.assert_array_equal(trained.decode(trained.encode(images)).numpy(), images)


def test_every_weight_gets_a_gradient_and_no_hidden_variables(trained):
  images = _images()
  x = tf.cast(images, tf.float32)
  with tf.GradientTape() as tape:
    loss = -tf.reduce_mean(trained(x, training=True))
  watched = {id(v) for v in tape.watched_variables()}
  grads = tape.gradient(loss, trained.trainable_variables)
  missing = [v.path for v, g in zip(trained.trainable_variables, grads) if g is None]
  assert not missing, f'no gradient for {missing}'
  zero = [v.path for v, g in zip(trained.trainable_variables, grads) if not np.any(g.numpy())]
  assert not zero, f'zero gradient for {zero}'
  known = {id(v.value) for v in trained.variables} | {id(v) for v in trained.variables}
  hidden = [v.name for v in tape.watched_variables() if id(v) not in known]
  assert not hidden, f'variables outside the Keras model: {hidden}'
  assert watched


def test_samples_are_valid_images(tiny):
  samples = tiny.sample(5, temperature=0.8, seed=3)
  assert samples.shape == (5, 8, 8, 1) and samples.dtype == tf.uint8
  again = tiny.sample(5, temperature=0.8, seed=3)
  np.testing.assert_array_equal(samples, again)
  cold = tiny.sample(2, temperature=0.)
  np.testing.assert_array_equal(cold[0], cold[1])


def test_fit_lowers_bits_per_dim(tiny):
  import keras
  images = np.tile(_images(n=4, seed=1), (4, 1, 1, 1))
  before = float(np.mean(tiny.bits_per_dim(images)))
  tiny.compile(keras.optimizers.Adamax(1e-2), jit_compile=True)
  tiny.fit(images, epochs=15, batch_size=16, verbose=0)
  after = float(np.mean(tiny.bits_per_dim(images)))
  assert after < before - 0.2, (before, after)


def test_bound_below_importance_weighted_estimate(trained):
  images = _images(n=8)
  bound = np.mean([np.mean(trained.log_prob(images)) for _ in range(4)])
  iw = [float(np.mean(trained.log_prob(images, num_samples=k))) for k in (4, 32)]
  assert bound <= iw[0] + 1e-3 and iw[0] <= iw[1] + 0.05, (bound, iw)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((8, 8, 1), np.uint8), 'rank 4'),
    (np.zeros((2, 8, 8, 3), np.uint8), 'shape'),
    (np.zeros((2, 8, 8, 1), np.float32), 'uint8'),
    (np.full((2, 8, 8, 1), 300, np.int32), r'\[0, 255\]'),
])
def test_bad_images_are_refused(bad, message):
  model = tfflows.build_model(tfflows.FlowConfig(**TINY['glow']))
  with pytest.raises(ValueError, match=message):
    model.log_prob(bad)


def test_unknown_model_lists_known_ones():
  with pytest.raises(ValueError, match='known models: glow, realnvp'):
    tfflows.build_model(tfflows.FlowConfig(model='pixelcnn'))


def test_seeded_log_prob_is_deterministic(tiny):
  images = _images()
  a = tiny.log_prob(images, seed=5).numpy()
  np.testing.assert_array_equal(a, tiny.log_prob(images, seed=5).numpy())
  assert not np.array_equal(a, tiny.log_prob(images, seed=6).numpy())
  np.testing.assert_array_equal(tiny.log_prob(images, num_samples=3, seed=2),
                                tiny.log_prob(images, num_samples=3, seed=2))


def test_glow_coupling_networks_normalise_their_hidden_layers_from_data():
  """Glow's coupling network as the reference code has it: bias-free hidden convolutions, each
  followed by an ActNorm. The data-dependent initialisation reaches them inside the steps'
  loop (3 steps a level, stacked weights): before it every step reports 3 uninitialised
  ActNorms (its own and its network's two), after it none, and each step's first network
  ActNorm got statistics of its own (different steps, different values)."""
  from bijectors import actnorm
  model = tfflows.build_model(tfflows.FlowConfig(**TINY['glow']))
  assert actnorm.actnorm_state(model)[0] == 3 * 2 * 3
  model.initialize(_images(8))
  assert actnorm.actnorm_state(model) == (0, 0)
  stacked = [l for l in model._flatten_layers() if hasattr(l, 'template_layers')]
  locs = [l.stacked(t.loc).numpy() for l in stacked for t in l.template_layers
          for t in t._flatten_layers() if t.name == 'norm_in']
  assert locs and all(np.all(loc != 0) and not np.allclose(loc[0], loc[1]) for loc in locs)
