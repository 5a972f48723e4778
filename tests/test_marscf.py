"""mAR-SCF: the model's mathematics, MARPS sampling, training, export and mAR interpolation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfflows
import tfflows.data
import tfflows.nn
from bijectors import mixlogcdf, repeated
from tfflows import interpolation
from tfflows.distributions import joint
from tfflows.distributions.mar_prior import MARPrior, marps_num_steps
from tests import flagfiles
from tests import flow_checks

TINY = dict(model='marscf', image_shape=(8, 8, 1), num_levels=2, steps_per_level=2, width=8,
            mar_hidden=4, mar_layers=2, num_components=4, coupling_blocks=1, attention_heads=2,
            dropout=0.2)
COUPLINGS = ('affine', 'mixlogcdf')


def _images(n=4, shape=(8, 8, 1), seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


def _tiny(coupling, **changes):
  return tfflows.build_model(tfflows.FlowConfig(**{**TINY, 'coupling': coupling, **changes}))


def _trained(model, images, steps=3):
  """Initialises ActNorm and moves every zero-initialised weight (coupling outputs, mAR heads)
  off zero with a few Adamax steps, so that every factor of the model is non-trivial."""
  model.compile(keras.optimizers.Adamax(2e-2))
  model.fit(images, epochs=steps, batch_size=len(images), verbose=0)
  return model


@pytest.fixture(scope='module', params=COUPLINGS)
def trained(request):
  """A tiny trained mAR-SCF per coupling, shared by the read-only tests of this module."""
  keras.utils.set_random_seed(7)
  return _trained(_tiny(request.param), _images(n=8, seed=1))


# -- structure ------------------------------------------------------------------------------
@pytest.mark.parametrize('levels, shape', [(1, (8, 8, 1)), (2, (8, 8, 3)), (3, (8, 8, 1)),
                                           (3, (32, 32, 3))])
def test_sequential_steps_match_formula(levels, shape):
  model = tfflows.build_model(tfflows.FlowConfig(
      model='marscf', image_shape=shape, num_levels=levels, steps_per_level=1, width=4,
      mar_hidden=2, mar_layers=1))
  expected = marps_num_steps(levels, shape[-1])
  assert model.num_sequential_sampling_steps == expected
  assert model.num_sequential_sampling_steps == sum(s[-1] for s in model.flow.latent_shapes)
  if shape == (32, 32, 3):
    assert expected == 66


def test_priors_follow_the_paper():
  """Unconditional mAR prior on top; conditional ones below with the per-level kernels."""
  model = tfflows.build_model(tfflows.FlowConfig(
      model='marscf', image_shape=(32, 32, 1), num_levels=4, steps_per_level=1, width=4,
      mar_hidden=3, mar_layers=3))
  assert all(isinstance(p, MARPrior) for p in model.priors)
  top, *splits = model.priors
  assert top.context_channels is None and top.lstm.kernel_size == 3
  # top-down: levels 3, 2, 1 (1-based) -> 3x3, 5x5, 5x5 dilation 2.
  assert [(p.lstm.kernel_size, p.lstm.dilation) for p in splits] == [(3, 1), (5, 1), (5, 2)]
  assert [p.context_channels for p in splits] == [8, 4, 2]
  assert [p.channels for p in model.priors] == [32, 8, 4, 2]
  assert all(p.lstm.num_layers == 3 and p.lstm.hidden == 3 for p in model.priors)
  embed = splits[-1].embed.layers
  assert [(l.kernel_size, l.filters) for l in embed] == [((5, 5), 32), ((5, 5), 4)]


def test_mixlogcdf_steps_use_the_attention_conditioner():
  model = _tiny('mixlogcdf')
  loops = repeated.find_repeated(model.flow)   # one loop of steps per level
  assert [r.num_steps for r in loops] == [TINY['steps_per_level']] * TINY['num_levels']
  couplings = [b for r in loops for b in r.template.bijectors
               if isinstance(b, mixlogcdf.MixLogCDFCoupling)]
  assert len(couplings) == TINY['num_levels']
  net = couplings[0].conditioner
  assert isinstance(net, tfflows.nn.GatedResidualAttentionNet)
  assert net.dropout_rate == 0.2 and net.num_heads == 2 and couplings[0].num_components == 4


# -- the likelihood -------------------------------------------------------------------------
def test_log_prob_equals_tfp_distribution(trained):
  """The training path (contexts from the forward pass, teacher-forced mAR priors) equals the
  TransformedDistribution over the JointDistributionCoroutine prior (level inverses)."""
  images = _images(seed=2)
  values = tf.cast(images, tf.float32) + 0.5
  fast = trained.log_weight(tf.cast(images, tf.float32), midpoint=True)
  exact = trained.distribution.log_prob(values)
  np.testing.assert_allclose(fast, exact, rtol=1e-5, atol=1e-3)
  latents, _, _ = trained.flow.encode(values)
  np.testing.assert_allclose(interpolation.latent_log_prob(trained, latents),
                             joint.joint_prior(trained.flow, trained.priors).log_prob(latents),
                             rtol=1e-5, atol=1e-3)


def test_log_det_matches_autodiff_jacobian(trained):
  images = _images(n=2, seed=3)
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
  images = _images(seed=4)
  np.testing.assert_array_equal(trained.decode(trained.encode(images)).numpy(), images)


def test_implicit_inverse_gradient(float64):
  """The MixLogCDF inverse used by mAR-SCF is differentiable: d inverse / dy is the inverse
  of d forward / dx (implicit function theorem), through both y2 and the conditioner on y1."""
  out = mixlogcdf.MixLogCDFCoupling.conditioner_channels(4, 3)
  net = keras.layers.Conv2D(out, 3, padding='same',
                            kernel_initializer=keras.initializers.RandomNormal(stddev=0.2),
                            bias_initializer=keras.initializers.RandomNormal(stddev=0.5))
  coupling = mixlogcdf.MixLogCDFCoupling(net, 4, num_components=3)
  x = tf.random.normal([1, 2, 2, 4], dtype=tf.float64)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    y, _ = coupling.forward_and_log_det(x)
  j_forward = tf.reshape(tape.jacobian(y, x, experimental_use_pfor=False), [16, 16])
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(y)
    x_back, _ = coupling.inverse_and_log_det(y)
  j_inverse = tf.reshape(tape.jacobian(x_back, y, experimental_use_pfor=False), [16, 16])
  np.testing.assert_allclose(x_back, x, atol=1e-10)
  np.testing.assert_allclose(j_inverse @ j_forward, np.eye(16), atol=1e-8)
  flow_checks.assert_log_det_matches_jacobian(coupling, x, atol=1e-8)


# -- MARPS sampling -------------------------------------------------------------------------
def test_marps_samples(trained):
  x, latents = joint.sample_top_down(trained.flow, trained.priors, 5, temperature=0.8, seed=3)
  assert x.shape == (5, 8, 8, 1)
  assert [tuple(z.shape[1:]) for z in latents] == [tuple(s) for s in trained.flow.latent_shapes]
  log_density = trained.distribution.log_prob(x)
  assert log_density.shape == (5,) and np.all(np.isfinite(log_density))
  # The sampled latents are the encoding of the sample (the levels were inverted exactly).
  encoded, _, _ = trained.flow.encode(x)
  for z, e in zip(latents, encoded):
    np.testing.assert_allclose(e, z, atol=2e-3)
  images = trained.sample(5, temperature=0.8, seed=3)
  assert images.shape == (5, 8, 8, 1) and images.dtype == tf.uint8
  np.testing.assert_array_equal(images, trained.sample(5, temperature=0.8, seed=3))
  cold = trained.sample(2, temperature=0.)
  np.testing.assert_array_equal(cold[0], cold[1])


# -- training and export --------------------------------------------------------------------
def _fit_embedded(coupling, num_levels):
  """bits/dim of 32 embedded training digits before and after a few jit-compiled epochs."""
  images = tfflows.data.load_embedded('train')[0][:32]
  model = tfflows.build_model(tfflows.FlowConfig(
      **{**TINY, 'image_shape': (32, 32, 1), 'num_levels': num_levels, 'steps_per_level': 1,
         'mar_layers': 1, 'coupling': coupling}))
  before = float(np.mean(model.bits_per_dim(images, seed=0)))
  model.compile(keras.optimizers.Adamax(1e-2), jit_compile=True)
  history = model.fit(images, epochs=6, batch_size=16, verbose=0)
  after = float(np.mean(model.bits_per_dim(images, seed=0)))
  assert np.all(np.isfinite(history.history['bpd']))
  assert after < before - 0.3, (before, after)


def test_fit_on_embedded_data_lowers_bits_per_dim():
  """Affine mAR-SCF, two levels (XLA compilation dominates the time of this test)."""
  _fit_embedded('affine', num_levels=2)


@pytest.mark.slow
@pytest.mark.parametrize('coupling', COUPLINGS)
def test_fit_on_embedded_data_three_levels(coupling):
  _fit_embedded(coupling, num_levels=3)


def test_export_gives_identical_numbers(trained, tmp_path):
  from tfflows import export  # pylint: disable=import-outside-toplevel
  path = export.export_saved_model(trained, tmp_path / 'export' / '1')
  loaded, config = export.load_exported(path)
  assert config == trained.config
  images = _images(n=3, seed=5)
  served = loaded.signatures['serving_default'](images=tf.constant(images))
  np.testing.assert_array_equal(served['log_prob'], trained.log_prob(images, seed=0))
  np.testing.assert_array_equal(served['bits_per_dim'], trained.bits_per_dim(images, seed=0))
  sampled = loaded.signatures['sample'](num_samples=tf.constant(4),
                                        temperature=tf.constant(0.7), seed=tf.constant(11))
  np.testing.assert_array_equal(sampled['images'], trained.sample(4, temperature=0.7, seed=11))


# -- mAR interpolation ----------------------------------------------------------------------
def test_mar_interpolation_raises_path_density(trained):
  a, b = _images(n=2, seed=6), _images(n=2, seed=7)
  images, info = interpolation.mar_interpolation(trained, a, b, steps=5, iterations=40,
                                                 lambda1=0.3, lambda2=0.3, return_info=True)
  assert images.shape == (2, 5, 8, 8, 1) and images.dtype == tf.uint8
  np.testing.assert_array_equal(images[:, 0], a)  # end points unchanged
  np.testing.assert_array_equal(images[:, -1], b)
  mar, linear = info['log_prob'].numpy(), info['log_prob_linear'].numpy()
  np.testing.assert_allclose(mar[:, [0, -1]], linear[:, [0, -1]], rtol=1e-6)
  assert np.all(mar[:, 1:-1] > linear[:, 1:-1]), (mar, linear)
  before, after = info['energy'].numpy()
  assert after < before


@pytest.mark.parametrize('trained', ['affine'], indirect=True)
def test_mar_interpolation_keeps_latent_end_points_and_linear_at_zero_weight(trained):
  za, zb = trained.encode(_images(n=1, seed=8)), trained.encode(_images(n=1, seed=9))
  path, _ = interpolation.mar_interpolate_latents(trained, za, zb, steps=4, iterations=5,
                                                  lambda1=0., lambda2=0.3)
  linear = interpolation.linear_path(za, zb, 4)
  for p, l, a, b in zip(path, linear, za, zb):
    np.testing.assert_array_equal(p[:, 0], a)
    np.testing.assert_array_equal(p[:, -1], b)
    np.testing.assert_allclose(p, l, atol=1e-6)  # lambda1 = 0: the linear path is optimal
  with pytest.raises(ValueError, match='steps'):
    interpolation.mar_interpolate_latents(trained, za, zb, steps=1)


# -- sampling-time benchmark and configs ----------------------------------------------------
def test_marps_timing_table():
  from train import marps_timing  # pylint: disable=import-outside-toplevel
  rows = marps_timing.run(sizes=(8, 16), channels=1, coupling='affine', batch_size=2,
                          repeats=1, modes=('graph',), steps_per_level=1, width=4,
                          mar_hidden=2, mar_layers=1)
  assert [(r['N'], r['levels'], r['steps']) for r in rows] == [(8, 1, 4), (16, 2, 10)]
  assert all(r['graph_seconds'] > 0 for r in rows)
  lines = marps_timing.format_table(rows).splitlines()
  assert len(lines) == 3 and 'seq. steps' in lines[0]
  assert marps_timing.levels_for(32) == 3 and marps_timing.levels_for(64) == 4


@pytest.mark.parametrize('name, levels, coupling, steps, width', [
    ('marscf_affine_cifar10', 3, 'affine', 32, 512),
    ('marscf_mixlogcdf_cifar10', 3, 'mixlogcdf', 4, 96),
    ('marscf_imagenet32', 3, 'mixlogcdf', 4, 96),
    ('marscf_imagenet64', 4, 'mixlogcdf', 4, 96),
    ('marscf_affine_mnist', 3, 'affine', 4, 32),
    ('marscf_mixlogcdf_mnist', 3, 'mixlogcdf', 2, 32),
])
def test_configs(name, levels, coupling, steps, width):
  """Each configs/marscf_*.flags, read by train.main's flags, holds the paper's settings."""
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).resolve().parent.parent / 'configs' / f'{name}.flags'
  values, config = flagfiles.parse(path)
  assert (config.model, config.num_levels, config.coupling, config.steps_per_level,
          config.width) == ('marscf', levels, coupling, steps, width)
  if 'mnist' not in name:
    assert values['learning_rate'] == 8e-4 and values['optimizer'] == 'adamax'
    assert values['batch_size'] == (128 if coupling == 'affine' else 64)
    assert config.mar_hidden == 32 and config.mar_layers == 3
    if coupling == 'mixlogcdf':
      assert (config.num_components, config.dropout, config.coupling_blocks) == (32, 0.2, 10)
