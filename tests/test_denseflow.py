"""DenseFlow: cross-unit coupling, variational dequantization, the model and its contract."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import bijectors as fb
import tfflows
from bijectors import actnorm, cross_unit, repeated
from tfflows.distributions import variational_dequantization as vd
from tfflows.models import denseflow
from tfflows.models import flow_model
from tfflows.nn import torch_init
from tfflows.nn.nystrom import NystromAttention
from tests import flow_checks

tfd = tfp.distributions

OFFICIAL_DF_74_10 = 130_647_294
DF_74_10 = dict(model='denseflow', image_shape=(32, 32, 3), block_conf=(6, 4, 1),
                layers_conf=(5, 6, 20), layer_mid_channels=(48, 48, 48), growth_rate=10,
                split_prior='standard', dequantization='variational')
# conditioner_precision='float32': the default 'auto' picks bfloat16 on some CPUs only, and the
# tests must give the same numbers on every CPU (bfloat16 networks have their own test).
TINY = dict(model='denseflow', image_shape=(8, 8, 1), block_conf=(2, 2), layers_conf=(1, 1),
            layer_mid_channels=(8, 8), growth_rate=2, dense_layers=1, dense_growth=4,
            split_prior='standard', dequantization='variational',
            conditioner_precision='float32')
# Conditioners small enough for float64 Jacobians (attention over 2x2 = 4 pixels, 4 landmarks).
SMALL_NETS = tfflows.FlowConfig(model='denseflow', dense_layers=1, dense_growth=4,
                                num_landmarks=4, pinv_iterations=6,
                                conditioner_precision='float32')


def _images(n=4, shape=(8, 8, 1), seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


def _perturb(variables, scale=0.1, seed=0):
  """Moves every trainable weight off its (zero) initialisation so no map is trivial."""
  rng = np.random.RandomState(seed)
  for v in variables:
    v.assign(v + scale * rng.standard_normal(v.shape).astype(str(v.dtype)))


def _block(channels=2, spatial=(2, 2), units=3, steps=1, growth=2, include_previous=False,
           config=SMALL_NETS):
  unit_list = []
  for u in range(units):
    c = channels + u * growth
    unit_list.append(fb.Chain(
        [b for s in range(steps)
         for b in denseflow.flow_step(c, 4, config, f'u{u}s{s}')], name=f'u{u}'))
  return cross_unit.CrossUnitBlock(unit_list, channels, growth, spatial,
                                   include_previous=include_previous, name='block')


def _block_inputs(block, batch, dtype, seed=0):
  rng = np.random.RandomState(seed)
  h, w = block.spatial_shape
  x = tf.constant(rng.standard_normal((batch, h, w, block.in_channels)), dtype)
  noise = [tf.constant(rng.standard_normal((batch,) + s), dtype) for s in block.noise_shapes]
  return x, noise


def _ready_block(dtype, batch=2, **kwargs):
  block = _block(**kwargs)
  x, noise = _block_inputs(block, batch, dtype)
  with actnorm.data_initialization():        # builds the layers and initialises ActNorm
    block.forward_and_log_det(x, noise=noise)
  _perturb([v for l in block.layers for v in l.trainable_weights])
  return block, x, noise


# -- cross-unit coupling --------------------------------------------------------------------
@pytest.mark.parametrize('include_previous', [False, True])
def test_cross_unit_log_det_matches_joint_jacobian(float64, include_previous):
  """log|det d y / d(x, e_1, e_2)| of the joint map, from autodiff, equals the block's log-det
  (which includes sum log sigma of the cross-unit couplings)."""
  block, x, noise = _ready_block(float64, include_previous=include_previous)
  _, log_det = block.forward_and_log_det(x, noise=noise)
  sizes = [int(np.prod(t.shape[1:])) for t in [x] + noise]
  for b in range(x.shape[0]):
    jac = flow_checks.autodiff_jacobian(
        lambda xe: block.forward_and_log_det(xe[0], noise=xe[1:])[0],
        [t[b:b + 1] for t in [x] + noise])
    assert jac.shape == (sum(sizes), sum(sizes))
    _, logabsdet = np.linalg.slogdet(jac)
    np.testing.assert_allclose(log_det[b], logabsdet, rtol=1e-8, atol=1e-8)


def test_cross_unit_log_det_is_units_plus_sum_log_sigma(float64):
  """The block's log-det is the units' log-dets plus sum log sigma_i of the cross-unit
  couplings, recomputed here step by step from the docstring's definitions."""
  block, x, noise = _ready_block(float64)
  _, log_det = block.forward_and_log_det(x, noise=noise)
  units, cross = 0., 0.
  h, outputs = x, []
  for i, unit in enumerate(block.units):
    if i:
      context = tf.concat([x] + outputs[:i - 1], -1)
      mu, log_sigma = block.nets[i - 1](context)
      cross += tf.reduce_sum(log_sigma, [1, 2, 3])
      h = tf.concat([h, mu + tf.exp(log_sigma) * noise[i - 1]], -1)
    h, ldj = unit.forward_and_log_det(h)
    units += ldj
    outputs.append(h)
  np.testing.assert_allclose(log_det, units + cross, rtol=1e-10)
  assert np.all(np.abs(cross.numpy()) > 1e-3)


@pytest.mark.parametrize('include_previous', [False, True])
def test_block_inverse_recovers_input_and_noise(float64, include_previous):
  block, x, noise = _ready_block(float64, include_previous=include_previous, units=4, steps=2)
  y, log_det = block.forward_and_log_det(x, noise=noise)
  assert y.shape[-1] == block.in_channels + 3 * block.growth_rate
  x_back, noise_back, ildj = block.inverse_with_noise(y)
  np.testing.assert_allclose(x_back, x, atol=1e-10)
  for e, e_back in zip(noise, noise_back):
    np.testing.assert_allclose(e_back, e, atol=1e-10)
  np.testing.assert_allclose(ildj, -log_det, atol=1e-9)
  x_only, ildj_only = block.inverse_and_log_det(y)
  np.testing.assert_allclose(x_only, x, atol=1e-10)
  np.testing.assert_allclose(ildj_only, ildj, atol=1e-10)


def test_a_block_of_bfloat16_networks_builds_on_its_own():
  """A CrossUnitBlock built outside build_model from DenseFlow steps whose networks compute in
  bfloat16 and are built at the first call (no spatial shape given): every layer of every
  network computes in bfloat16 (also those a network creates when it is built), the block maps
  float32 to float32 and its inverse recovers the input and the noise."""
  block = _block(config=SMALL_NETS.replace(conditioner_precision='bfloat16'))
  x, noise = _block_inputs(block, 2, tf.float32)
  block.forward_and_log_det(x, noise=noise)   # builds every layer
  _perturb([v for l in block.layers for v in l.trainable_weights])
  nets = [l for l in block.layers if l.dtype_policy.name != 'float32']
  assert len(nets) == 3 and {type(n).__name__ for n in nets} == {'DenseFlowConditioner'}
  layers = [l for n in nets for l in n._flatten_layers()]  # pylint: disable=protected-access
  assert {l.dtype_policy.name for l in layers} == {'mixed_bfloat16'}
  y, log_det = block.forward_and_log_det(x, noise=noise)
  assert y.dtype == log_det.dtype == tf.float32
  x_back, noise_back, ildj = block.inverse_with_noise(y)
  np.testing.assert_allclose(x_back, x, atol=1e-5)
  for e, e_back in zip(noise, noise_back):
    np.testing.assert_allclose(e_back, e, atol=1e-4)
  np.testing.assert_allclose(ildj, -log_det, rtol=1e-5, atol=1e-4)


def test_block_traces_with_unknown_batch_under_xla():
  block, x, noise = _ready_block(tf.float32, units=2)
  specs = [tf.TensorSpec([None] + t.shape[1:].as_list(), t.dtype) for t in [x] + noise]
  fwd = tf.function(lambda x, *e: block.forward_and_log_det(x, noise=list(e)),
                    input_signature=specs, jit_compile=True)
  y, log_det = fwd(x, *noise)
  y_eager, log_det_eager = block.forward_and_log_det(x, noise=noise)
  np.testing.assert_allclose(y, y_eager, atol=1e-4)
  np.testing.assert_allclose(log_det, log_det_eager, rtol=1e-5, atol=1e-3)
  inv = tf.function(lambda y: block.inverse_with_noise(y),
                    input_signature=[tf.TensorSpec([None] + y.shape[1:].as_list())],
                    jit_compile=True)
  x_back, noise_back, _ = inv(y)
  np.testing.assert_allclose(x_back, x, atol=1e-4)
  np.testing.assert_allclose(noise_back[-1], noise[-1], atol=1e-3)


def test_context_channels_follow_dense_connectivity():
  # c_0 = 12, g = 10 (DF-74-10 block 1): 12, 24, 46, 78, 120 channels before units 1..5.
  assert [cross_unit.context_channels(12, 10, i) for i in range(1, 6)] == [12, 24, 46, 78, 120]
  block = _block(units=3)
  x, noise = _block_inputs(block, 1, tf.float32)
  block.forward_and_log_det(x, noise=noise)
  kernels = [net.hidden.kernel.shape for net in block.nets]
  assert [k[2] for k in kernels] == [2, 4]       # x_0; then x_0 and y_0
  assert [k[3] for k in kernels] == [8, 16]      # 4 x context channels


def test_block_refuses_wrong_noise():
  block = _block(units=3)
  x, noise = _block_inputs(block, 1, tf.float32)
  with pytest.raises(ValueError, match='expected 2 noise tensors'):
    block.forward_and_log_det(x, noise=noise[:1])


# -- variational dequantization -------------------------------------------------------------
def _ready_dequantizer(dtype, shape=(2, 2, 1)):
  deq = vd.VariationalDequantizer(shape, name='deq')
  images = tf.constant(_images(3, shape), dtype)
  deq(images, midpoint=True)
  _perturb(deq.trainable_weights, scale=0.05)
  return deq, images


def test_variational_dequantization_log_q_matches_jacobian(float64):
  """log q(u | x) = log N(e) - log|det du/de| with the Jacobian of the conditional flow."""
  deq, images = _ready_dequantizer(float64)
  seed = tf.constant([3, 4])
  values, log_q = deq(images, seed=seed)
  u = values - images
  assert np.all((u.numpy() > 0) & (u.numpy() < 1))
  eps = tf.random.stateless_normal(tf.concat([[3], deq.latent_shape], 0), seed, dtype=float64)
  e = deq.base.loc + tf.exp(deq.base.log_scale) * eps
  context = deq.context_net(images)
  flow_forward = deq._flow_forward  # pylint: disable=protected-access
  for b in range(3):
    eb = e[b:b + 1]
    ub, _ = flow_forward(eb, context[b:b + 1])
    jac = flow_checks.autodiff_jacobian(lambda eb: flow_forward(eb, context[b:b + 1])[0], eb)
    _, logabsdet = np.linalg.slogdet(jac)
    expected = deq.base.distribution().log_prob(eb)[0] - logabsdet
    np.testing.assert_allclose(log_q[b], expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ub[0], u[b], atol=1e-12)
  # Evaluating log q at the sampled u through the inverse flow gives the same number.
  np.testing.assert_allclose(deq.log_prob(u, images), log_q, rtol=1e-9, atol=1e-8)


def test_variational_dequantization_midpoint_and_seeds():
  deq, images = _ready_dequantizer(tf.float32, shape=(4, 4, 3))
  values, log_q = deq(images, midpoint=True)
  np.testing.assert_array_equal(values, images + 0.5)
  np.testing.assert_allclose(log_q, deq.log_prob(tf.fill(images.shape, 0.5), images), rtol=1e-6)
  a = deq(images, seed=tf.constant([1, 2]))
  b = deq(images, seed=tf.constant([1, 2]))
  np.testing.assert_array_equal(a[0], b[0])
  u = deq(images, seed=keras.random.SeedGenerator(0))[0] - images
  assert np.all((u.numpy() > 0) & (u.numpy() < 1))


def test_variational_dequantization_under_xla():
  """Sampling u, log q and their gradients compile with XLA; the compiled log q is the exact
  log q of the compiled u (checked eagerly through the inverse flow). XLA may draw different
  random numbers than eager mode for the same stateless seed, so values are not compared."""
  deq, images = _ready_dequantizer(tf.float32, shape=(4, 4, 1))

  @tf.function(jit_compile=True)
  def sample_and_grads(images, seed):
    with tf.GradientTape() as tape:
      values, log_q = deq(images, seed=seed)
      loss = tf.reduce_sum(log_q) + tf.reduce_sum(tf.square(values - images))
    return values, log_q, tape.gradient(loss, deq.trainable_weights)

  values, log_q, grads = sample_and_grads(images, tf.constant([5, 6]))
  u = values - images
  assert np.all((u.numpy() > 0) & (u.numpy() < 1))
  np.testing.assert_allclose(log_q, deq.log_prob(u, images), rtol=1e-4, atol=1e-3)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert all(np.any(g.numpy() != 0) for g in grads)


def test_variational_dequantizer_has_the_official_size():
  deq = vd.VariationalDequantizer((32, 32, 3))
  deq(tf.zeros((1, 32, 32, 3)), midpoint=True)
  count = sum(int(np.prod(v.shape)) for v in deq.trainable_weights)
  assert count == 2_395_784


# -- the model ------------------------------------------------------------------------------
def _trained_once(model, images):
  model.compile(keras.optimizers.SGD(1e-2))
  model.fit(images, epochs=1, batch_size=len(images), verbose=0)
  return model


@pytest.fixture(scope='module')
def tiny():
  keras.utils.set_random_seed(7)
  model = tfflows.build_model(tfflows.FlowConfig(**TINY))
  _trained_once(model, _images(8))
  _perturb([v for l in model.flow.layers if 'cross' in l.name for v in l.trainable_weights],
           scale=0.05)
  return model


def test_tiny_shapes(tiny):
  assert [tuple(s) for s in tiny.flow.noise_shapes] == [(4, 4, 2), (2, 2, 2)]
  assert [tuple(s) for s in tiny.flow.latent_shapes] == [(2, 2, 14), (2, 2, 12)]


def test_decode_inverts_encode(tiny):
  images = _images(4, seed=3)
  np.testing.assert_array_equal(tiny.decode(tiny.encode(images)).numpy(), images)


def test_flow_inverse_recovers_dequantized_image_and_noise(tiny):
  images = tf.constant(_images(4, seed=4), tf.float32)
  values, _ = tiny.dequantizer(images, seed=tf.constant([0, 1]))
  noise, _ = tiny._augmentation_noise(4, seeds=[tf.constant([i, 2]) for i in range(2)])  # pylint: disable=protected-access
  latents, _, log_det = tiny.flow.encode(values, noise)
  back, noise_back, ildj = tiny.flow.decode_with_noise(latents)
  np.testing.assert_allclose(back, values, atol=2e-3)
  for e, e_back in zip(noise, noise_back):
    np.testing.assert_allclose(e_back, e, atol=2e-3)
  np.testing.assert_allclose(ildj, -log_det, rtol=1e-4, atol=5e-2)


def test_log_prob_equals_augmented_distribution_minus_noise_density(tiny):
  """For fixed noise, log w = distribution.log_prob([x + u, e...]) - log q(u|x) - log p*(e)."""
  images = tf.constant(_images(4, seed=5), tf.float32)
  seed = tf.constant([11, 12])
  log_w = tiny.log_weight(images, seed=seed)
  seeds = flow_model._split_seeds(seed, 1 + len(tiny.flow.noise_shapes), None)  # pylint: disable=protected-access
  values, log_q = tiny.dequantizer(images, seed=seeds[0])
  noise, log_p_noise = tiny._augmentation_noise(4, seeds=seeds[1:])  # pylint: disable=protected-access
  log_joint = tiny.distribution.log_prob([values] + noise)
  np.testing.assert_allclose(log_w, log_joint - log_q - log_p_noise, rtol=1e-5, atol=1e-2)
  standard = tfd.Normal(0., 1.)
  manual = sum(tf.reduce_sum(standard.log_prob(e), [1, 2, 3]) for e in noise)
  np.testing.assert_allclose(log_p_noise, manual, rtol=1e-6)


def test_bound_below_importance_weighted_estimates(tiny):
  images = _images(8, seed=6)
  bound = np.mean([np.mean(tiny.log_prob(images, seed=s)) for s in range(4)])
  iw = [float(np.mean(tiny.log_prob(images, num_samples=k, seed=1))) for k in (1, 10, 50)]
  assert bound <= iw[1] and iw[0] <= iw[1] and iw[1] <= iw[2] + 0.02, (bound, iw)


def test_samples_are_valid_and_seeded(tiny):
  a = tiny.sample(3, temperature=0.8, seed=4)
  assert a.shape == (3, 8, 8, 1) and a.dtype == tf.uint8
  np.testing.assert_array_equal(a, tiny.sample(3, temperature=0.8, seed=4))


def test_every_weight_gets_a_gradient(tiny):
  x = tf.constant(_images(4), tf.float32)
  with tf.GradientTape() as tape:
    loss = -tf.reduce_mean(tiny(x, training=True))
  grads = tape.gradient(loss, tiny.trainable_variables)
  missing = [v.path for v, g in zip(tiny.trainable_variables, grads)
             if g is None or not np.any(g.numpy())]
  assert not missing, missing


def test_reduced_precision_networks_keep_the_flow_float32():
  """conditioner_precision='bfloat16': the networks compute in bfloat16, everything else (and
  every variable) is float32; log_prob is float32 and decode(encode(x)) is still exact."""
  config = tfflows.FlowConfig(**{**TINY, 'conditioner_precision': 'bfloat16'})
  model = tfflows.build_model(config)
  assert keras.config.dtype_policy().name == 'float32'      # the global policy is restored
  layers = list(model._flatten_layers())  # pylint: disable=protected-access
  for steps in repeated.find_repeated(model.flow):   # the networks the step loops run
    layers += [l for t in steps.stacked.template_layers for l in t._flatten_layers()]  # pylint: disable=protected-access
  policies = {l.name: l.dtype_policy.name for l in layers}
  assert policies['block0_unit0_step0_net'] == 'mixed_bfloat16'
  assert policies['block0_cross1'] == 'mixed_bfloat16' and policies['context'] == 'mixed_bfloat16'
  assert policies['block0_unit0_step0_actnorm'] == 'float32' and policies['prior_top'] == 'float32'
  assert {v.dtype for v in model.trainable_variables} == {'float32'}
  images = _images(4, seed=8)
  _trained_once(model, images)
  log_prob = model.log_prob(images, seed=1)
  assert log_prob.dtype == tf.float32 and np.all(np.isfinite(log_prob))
  np.testing.assert_array_equal(model.decode(model.encode(images)).numpy(), images)


def test_uniform_dequantization_option():
  model = tfflows.build_model(tfflows.FlowConfig(**{**TINY, 'dequantization': 'uniform'}))
  assert model.dequantizer.__class__.__name__ == 'UniformDequantizer'
  values, log_q = model.dequantizer(tf.zeros((2, 8, 8, 1)), seed=tf.constant([0, 1]))
  assert np.all(log_q.numpy() == 0) and np.all((values.numpy() >= 0) & (values.numpy() < 1))


def test_learned_split_prior_option():
  model = tfflows.build_model(tfflows.FlowConfig(**{**TINY, 'split_prior': 'learned'}))
  assert type(model.priors[1]).__name__ == 'GlowSplitPrior'
  counted = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  assert counted == denseflow.parameter_count(model.config)['total']


def _network_layers(model):
  """Every Keras layer of the model, the template layers of repeated steps included."""
  for layer in model._flatten_layers(include_self=False):
    yield layer
    for template in getattr(layer, 'template_layers', ()):
      yield from template._flatten_layers(include_self=True)


@pytest.mark.parametrize('attention', ['official', 'published'])
def test_attention_form_reaches_every_coupling_network(attention):
  """--attention picks the form of every coupling network's attention; 'official' (what the
  authors' code computes) is the default."""
  config = tfflows.FlowConfig(**{**TINY, 'attention': attention})
  assert tfflows.FlowConfig(**TINY).attention == 'official'
  model = tfflows.build_model(config)
  layers = [l for l in _network_layers(model) if isinstance(l, NystromAttention)]
  assert len(layers) == 4 and {l.form for l in layers} == {attention}


def test_every_network_initialises_as_the_official_code():
  """Coupling networks, cross-unit networks g_i and the variational dequantizer: every
  convolution has PyTorch's default initialisation (tfflows.nn.torch_init), except the
  zero-initialised output convolutions."""
  model = tfflows.build_model(tfflows.FlowConfig(**{**TINY, 'layers_conf': (3, 3)}))
  convs = [l for l in _network_layers(model) if isinstance(l, keras.layers.Conv2D)]
  plain = [c for c in convs if not isinstance(c, torch_init.Conv2D)]
  assert len(convs) > 3 * len(plain) > 0
  assert all(isinstance(c.kernel_initializer, keras.initializers.Zeros) for c in plain)


@pytest.mark.parametrize('changes, message', [
    (dict(attention='pixels'), 'attention'),
    (dict(image_shape=(10, 10, 1)), 'divisible by 4'),
    (dict(num_landmarks=3), 'num_landmarks'),
    (dict(block_conf=(2, 0)), 'positive'),
    (dict(conditioner_precision='int8'), 'conditioner_precision'),
])
def test_bad_configs_are_refused(changes, message):
  with pytest.raises(ValueError, match=message):
    tfflows.build_model(tfflows.FlowConfig(**{**TINY, **changes}))


# -- parameter count ------------------------------------------------------------------------
def test_parameter_count_formula_matches_a_built_model():
  config = tfflows.FlowConfig(**{**TINY, 'block_conf': (3, 2), 'growth_rate': 3})
  model = tfflows.build_model(config)
  counted = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  assert counted == denseflow.parameter_count(config)['total']


def test_df_74_10_parameter_count_analytic():
  counts = denseflow.parameter_count(tfflows.FlowConfig(**DF_74_10))
  assert counts['total'] == OFFICIAL_DF_74_10
  assert counts['dequantizer'] == 2_395_784 and counts['cross_unit_nets'] == 8_947_480


def test_df_74_10_first_block_built_matches_formula():
  """Builds only DF-74-10's first dense block (48.1M parameters, its networks built without
  running them) and counts it."""
  config = tfflows.FlowConfig(**DF_74_10)
  block = denseflow.dense_block(0, 12, (16, 16), config)
  counted = sum(int(np.prod(v.shape)) for l in block.layers for v in l.trainable_weights)
  first = tfflows.FlowConfig(**{**DF_74_10, 'block_conf': (6,), 'layers_conf': (5,),
                                'layer_mid_channels': (48,), 'dequantization': 'uniform'})
  counts = denseflow.parameter_count(first)
  assert counted == counts['total'] - counts['top_prior'] == 48_061_410


@pytest.mark.slow
def test_df_74_10_parameter_count_built():
  model = tfflows.build_model(tfflows.FlowConfig(**DF_74_10))
  counted = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  assert counted == OFFICIAL_DF_74_10
  assert [tuple(s) for s in model.flow.latent_shapes] == [(4, 4, 308), (4, 4, 308), (8, 8, 124)]
  assert sum(int(np.prod(s)) for s in model.flow.noise_shapes) == 14_720


# -- training and export --------------------------------------------------------------------
EMBEDDED = dict(model='denseflow', image_shape=(32, 32, 1), block_conf=(2, 1), layers_conf=(1, 1),
                layer_mid_channels=(8, 8), growth_rate=2, dense_layers=1, dense_growth=8,
                split_prior='standard', dequantization='uniform', conditioner_precision='float32')


def _assert_export_agrees(model, images, directory):
  from tfflows import export  # pylint: disable=import-outside-toplevel
  expected = model.log_prob(images, seed=export.SERVING_SEED).numpy()
  path = export.export_saved_model(model, directory)
  loaded, config = export.load_exported(path)
  assert config == model.config
  served = loaded.signatures['serving_default'](images=tf.constant(images))
  np.testing.assert_array_equal(served['log_prob'].numpy(), expected)
  np.testing.assert_allclose(served['bits_per_dim'], model.to_bits_per_dim(expected), rtol=1e-6)
  samples = loaded.signatures['sample'](num_samples=tf.constant(2), temperature=tf.constant(0.8),
                                        seed=tf.constant(3))['images']
  np.testing.assert_array_equal(samples, model.sample(2, temperature=0.8, seed=3))


def test_tiny_denseflow_trains_on_embedded_data_and_exports(tmp_path):
  """Uniform dequantization keeps this fast; the variational dequantizer is trained under XLA
  by the ``tiny`` fixture and exported by the next test."""
  from tfflows.data.embedded import load_embedded  # pylint: disable=import-outside-toplevel
  images = np.asarray(load_embedded('train')[0][:64])
  model = tfflows.build_model(tfflows.FlowConfig(**EMBEDDED))
  before = float(np.mean(model.bits_per_dim(images, seed=0)))
  model.compile(keras.optimizers.Adamax(3e-3), jit_compile=True)
  model.fit(images, epochs=4, batch_size=16, verbose=0)
  after = float(np.mean(model.bits_per_dim(images, seed=0)))
  assert np.isfinite(after) and after < before - 0.3, (before, after)
  _assert_export_agrees(model, images[:8], tmp_path / 'export' / '1')


def test_variational_denseflow_exports_with_identical_numbers(tiny, tmp_path):
  _assert_export_agrees(tiny, _images(4, seed=9), tmp_path / 'export' / '1')


def test_benchmark_program_reports_every_part():
  """train.benchmark runs its three parts on a tiny DenseFlow (the figures themselves are
  measured with the program, not here)."""
  from train import benchmark   # pylint: disable=import-outside-toplevel
  config = tfflows.FlowConfig(**{**TINY, 'dequantization': 'uniform'})
  rows, info = benchmark.run_benchmark(config, batch_size=2, parts=('train', 'eval', 'sample'),
                                       steps=1, warmup=1, jit_compile=False)
  assert [r.part for r in rows] == ['train', 'eval', 'sample']
  assert info['parameters'] == denseflow.parameter_count(config)['total']
  for r in rows:
    assert r.images_per_s > 0 and r.s_per_call > 0 and r.peak_rss_gb > 0
    assert r.trace_s > 0 and r.first_call_s > 0 and r.cpu_s_per_call > 0
    assert r.graph_ops >= r.top_level_ops > 0 and r.hlo_mb is None   # no HLO without XLA
    # None where the allocator keeps no statistics (TensorFlow's plain CPU allocator, with
    # oneDNN off): reported as unavailable, never asserted. With oneDNN on, the CPU allocator
    # counts only allocations of 256 KiB or more, so this tiny model may read 0.
    assert r.tensor_peak_gb is None or r.tensor_peak_gb >= 0
  table = benchmark.format_table(rows).splitlines()   # a header, then one line a part
  assert [line.split()[0] for line in table[1:]] == [r.part for r in rows]
  for line, r in zip(table[1:], rows):   # a figure the allocator cannot give is named
    assert ('unavailable' in line) == (r.tensor_peak_gb is None)
