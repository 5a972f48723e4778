"""TFP's contract, checked on every bijector class in ``bijectors/`` and every model family.

Bijectors (float64, tiny events; ``CASES`` has a small constructor for every class, and
``test_every_bijector_class_has_a_contract_case`` fails for a class without one):

* one event [H, W, C] maps as x[0] of a batch does, with a scalar log-det; two leading axes
  [2, 3, H, W, C] map as the flat batch does, with a [2, 3] log-det (or a scalar when the
  Jacobian is constant), for the one-pass API, TFP's methods and conditioning inputs;
* ``trainable_variables`` / ``variables`` are exactly the Keras weights of ``bijector.layers``
  (also through an enclosing ``tf.Module``, and never an undeclared layer's);
* ``experimental_batch_shape()`` / ``_tensor()`` are [];
* the event-shape methods agree with real outputs, with and without leading axes;
* ``is_constant_jacobian`` is declared exactly by the bijectors whose log-det does not depend
  on x, and their log-det is indeed the same at two inputs;
* the log-det is log|det J| of the autodiff Jacobian, and the inverse is differentiable:
  J_inverse . J_forward = identity;
* forward and inverse trace with unknown leading axes under tf.function and XLA;
* a wrong rank or channel count raises ValueError.

Models (every family, tiny configs): ``model.distribution`` samples with shape () and [2, 3],
evaluates one image (scalar) and doubly batched tensors, has batch shape [], event shapes that
match its samples, exactly the model's weights as ``trainable_variables`` (minus the
dequantizer's), gradients through ``log_prob`` equal to the training path's, and every model
runs under a float64 Keras policy.
"""

import dataclasses
import importlib
import inspect
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import bijectors
import tfflows
from bijectors import base, cross_unit, mixlogcdf, multiscale, ordered, permute, repeated
from tfflows import split_permutations
from tfflows.distributions import joint
from tests import flow_checks

tfb = tfp.bijectors
ABSTRACT = {base.FlowBijector}
# Bijectors whose log-det does not depend on x. (ActNorm's reads x's statistics, without a
# gradient, only in its one data-initialisation pass; TFP's rule is about the gradient.)
CONSTANT_JACOBIAN = {bijectors.Squeeze, bijectors.ActNorm, bijectors.InvertibleConv1x1,
                     bijectors.ToUnitInterval, permute.ReverseChannels, permute.SwapHalves,
                     permute.ChannelPermutation, permute.FlatPermutation, ordered.OrderedSqueeze,
                     ordered.SplitPermutation}
BATCH = 6  # flat batch; doubly batched inputs are [2, 3, ...]


# -- constructors ---------------------------------------------------------------------------
def _conv(out_channels, kernel=3):
  return keras.layers.Conv2D(out_channels, kernel, padding='same',
                             kernel_initializer=keras.initializers.RandomNormal(stddev=0.3),
                             bias_initializer=keras.initializers.RandomNormal(stddev=0.3))


def _coupling(channels, mask='channel', parity=0, scale_fn='sigmoid'):
  out = bijectors.AffineCoupling.conditioner_channels(channels, mask)
  return bijectors.AffineCoupling(_conv(out), channels, mask=mask, parity=parity,
                                  scale_fn=scale_fn)


def _randomised(bijector):
  """Moves every trainable weight off its (often identity) initial value; ActNorm counts as
  initialised."""
  rng = np.random.default_rng(0)
  for layer in bijector.layers:
    for w in layer.weights:
      if w.trainable:
        w.assign(w.numpy() + 0.2 * rng.standard_normal(w.shape))
      elif w.name == 'initialized':
        w.assign(np.ones(w.shape))
  return bijector


def _block(in_channels=2, growth=1, spatial=(2, 2)):
  units = [bijectors.Chain([_coupling(in_channels + i * growth, parity=i % 2)], name=f'unit{i}')
           for i in range(2)]
  return cross_unit.CrossUnitBlock(units, in_channels, growth, spatial)


def _repeated(num_steps, remat=False):
  """K Glow-like steps (ActNorm, 1x1 convolution, coupling) as one loop over stacked
  weights (one tf.while_loop, whatever K)."""
  def make_step(k):
    return bijectors.Chain([_randomised(bijectors.ActNorm(2, name=f'actnorm_{k}')),
                            _randomised(bijectors.InvertibleConv1x1(2, name=f'conv1x1_{k}')),
                            _coupling(2, parity=k % 2)], name=f'step_{k}')
  return repeated.Repeated(make_step, num_steps, event_shape=(2, 2, 2), remat=remat)


def _multiscale():
  levels = [multiscale.Level(bijectors.Chain([bijectors.Squeeze(), _coupling(4)]),
                             keep_channels=2),
            multiscale.Level(bijectors.Chain([bijectors.Squeeze(), _coupling(8, parity=1)]))]
  return multiscale.MultiScaleFlow(levels, (4, 4, 1))


@dataclasses.dataclass
class Case:
  """make() -> bijector; shape: the event [H, W, C]; kind of input values; condition:
  name -> event shape of a conditioning input (same leading axes as x); channels: the
  channel count a wrong-channel input violates (None: not checked here)."""

  cls: type
  make: callable
  shape: tuple
  kind: str = 'normal'
  condition: dict = dataclasses.field(default_factory=dict)
  channels: int = None


CASES = {
    'squeeze': Case(bijectors.Squeeze, bijectors.Squeeze, (4, 4, 1)),
    'actnorm': Case(bijectors.ActNorm, lambda: _randomised(bijectors.ActNorm(3)), (2, 2, 3),
                    channels=3),
    'conv1x1_lu': Case(bijectors.InvertibleConv1x1,
                       lambda: _randomised(bijectors.InvertibleConv1x1(3, 'lu')), (2, 2, 3),
                       channels=3),
    'conv1x1_plain': Case(bijectors.InvertibleConv1x1,
                          lambda: _randomised(bijectors.InvertibleConv1x1(3, 'plain')),
                          (2, 2, 3), channels=3),
    'coupling_channel': Case(bijectors.AffineCoupling,
                             lambda: _coupling(3, 'channel', 1, 'tanh'), (2, 2, 3), channels=3),
    'coupling_checkerboard': Case(bijectors.AffineCoupling,
                                  lambda: _coupling(2, 'checkerboard', 0, 'exp_tanh'),
                                  (2, 2, 2), channels=2),
    'coupling_one_pixel': Case(bijectors.AffineCoupling, lambda: _coupling(2), (1, 1, 2),
                               channels=2),
    'coupling_channel_sigmoid': Case(bijectors.AffineCoupling,
                                     lambda: _coupling(3, 'channel', 0, 'sigmoid'), (2, 2, 3),
                                     channels=3),
    'coupling_checkerboard_odd': Case(bijectors.AffineCoupling,
                                      lambda: _coupling(2, 'checkerboard', 1, 'tanh'),
                                      (2, 2, 2), channels=2),
    'coupling_context': Case(
        bijectors.AffineCoupling,
        lambda: bijectors.AffineCoupling(_conv(4), 4, mask='channel', scale_fn='exp_tanh'),
        (2, 2, 4), condition={'context': (2, 2, 2)}, channels=4),
    'mixlogcdf': Case(mixlogcdf.MixLogCDFCoupling,
                      lambda: mixlogcdf.MixLogCDFCoupling(
                          _conv(mixlogcdf.MixLogCDFCoupling.conditioner_channels(2, 3)), 2,
                          num_components=3), (1, 1, 2), channels=2),
    'reverse': Case(permute.ReverseChannels, permute.ReverseChannels, (2, 2, 3)),
    'swap_halves': Case(permute.SwapHalves, permute.SwapHalves, (2, 2, 3)),
    'channel_permutation': Case(permute.ChannelPermutation,
                                lambda: permute.ChannelPermutation([2, 0, 1]), (2, 2, 3)),
    'flat_permutation': Case(permute.FlatPermutation,
                             lambda: permute.FlatPermutation(
                                 np.random.default_rng(1).permutation(16), (4, 4, 1),
                                 (2, 2, 4)), (4, 4, 1)),
    'ordered_squeeze': Case(ordered.OrderedSqueeze,
                            lambda: ordered.OrderedSqueeze(
                                np.random.default_rng(2).standard_normal((4, 4, 1))),
                            (4, 4, 1)),
    'split_permutation': Case(ordered.SplitPermutation,
                              lambda: ordered.SplitPermutation(
                                  np.random.default_rng(3).permutation(16), (2, 2, 4)),
                              (2, 2, 4)),
    'to_unit_interval': Case(bijectors.ToUnitInterval, bijectors.ToUnitInterval, (2, 2, 1),
                             kind='pixels'),
    'logit': Case(bijectors.Logit, lambda: bijectors.Logit(0.05), (2, 2, 1), kind='unit'),
    'chain': Case(bijectors.Chain,
                  lambda: bijectors.Chain([_randomised(bijectors.ActNorm(2)),
                                           _randomised(bijectors.InvertibleConv1x1(2)),
                                           _coupling(2)]), (2, 2, 2)),
    'cross_unit_block': Case(cross_unit.CrossUnitBlock, lambda: _randomised(_block()),
                             (2, 2, 2), condition={'noise': [(2, 2, 1)]}),
    'augmented_chain': Case(cross_unit.AugmentedChain,
                            lambda: cross_unit.AugmentedChain(
                                [bijectors.Squeeze(), _randomised(_block(4, 1, (1, 1)))]),
                            (2, 2, 1), condition={'noise': [(1, 1, 1)]}),
    'multi_scale_flow': Case(multiscale.MultiScaleFlow, _multiscale, (4, 4, 1)),
    'repeated_loop': Case(repeated.Repeated, lambda: _repeated(3), (2, 2, 2), channels=2),
    'repeated_two_steps': Case(repeated.Repeated, lambda: _repeated(2), (2, 2, 2), channels=2),
    'repeated_one_step': Case(repeated.Repeated, lambda: _repeated(1), (2, 2, 2), channels=2),
    'repeated_remat': Case(repeated.Repeated, lambda: _repeated(3, remat=True), (2, 2, 2),
                           channels=2),
}


def _bijector_classes():
  """Every tfp Bijector subclass defined in a module of the ``bijectors`` package."""
  found = set()
  for info in pkgutil.iter_modules(bijectors.__path__):
    module = importlib.import_module(f'bijectors.{info.name}')
    for _, obj in inspect.getmembers(module, inspect.isclass):
      if issubclass(obj, tfb.Bijector) and obj.__module__.startswith('bijectors.'):
        found.add(obj)
  return found


def test_every_bijector_class_has_a_contract_case():
  missing = _bijector_classes() - ABSTRACT - {case.cls for case in CASES.values()}
  assert not missing, (f'bijector classes without a contract case in tests/test_contract.py: '
                       f'{sorted(c.__name__ for c in missing)}')


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_bijector_keeps_the_mixed_policy_it_was_created_under(name, restore_policy):
  """A bijector created under a mixed Keras policy and first called (so built) after the policy
  is back to float32 keeps the policy in every layer (the sublayers a layer creates when it is
  built included), maps float32 to float32 and inverts its forward map."""
  case = CASES[name]
  keras.config.set_dtype_policy('mixed_bfloat16')
  b = case.make()
  keras.config.set_dtype_policy('float32')
  x, condition = tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), _inputs(case, [3]))
  y, fldj = b.forward_and_log_det(x, **condition)
  x_back, ildj = b.inverse_and_log_det(y, **condition)
  assert {t.dtype for t in tf.nest.flatten([y, fldj, x_back, ildj])} == {tf.float32}
  _assert_close(x_back, x, atol=1e-4)
  np.testing.assert_allclose(np.broadcast_to(fldj, [3]), -np.broadcast_to(ildj, [3]), atol=1e-4)
  policies = {l.path: l.dtype_policy.name for layer in b.layers
              for l in layer._flatten_layers()}  # pylint: disable=protected-access
  assert set(policies.values()) <= {'mixed_bfloat16'}, policies


# -- inputs ---------------------------------------------------------------------------------
def _values(shape, kind, seed):
  rng = np.random.default_rng(seed)
  if kind == 'pixels':
    return rng.uniform(0., 256., shape)
  if kind == 'unit':
    return rng.uniform(-0.45, 0.45, shape)
  return rng.standard_normal(shape)


def _inputs(case, leading, seed=0):
  """(x, condition) with the given leading axes, float64."""
  x = tf.constant(_values(tuple(leading) + case.shape, case.kind, seed))
  condition = {}
  for name, shape in case.condition.items():
    make = lambda s, k: tf.constant(_values(tuple(leading) + s, 'normal', seed + 10 + k))
    condition[name] = ([make(s, k) for k, s in enumerate(shape)] if isinstance(shape, list)
                       else make(shape, 0))
  return x, condition


def _index(structure, i):
  return tf.nest.map_structure(lambda t: t[i], structure)


def _reshape(structure, leading):
  return tf.nest.map_structure(
      lambda t: tf.reshape(t, list(leading) + t.shape[-3:].as_list()), structure)


def _assert_close(a, b, atol=1e-10):
  for u, v in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=1e-9)


def _check_log_det(log_det, leading):
  """A log-det has the leading shape, or is a scalar (the same for every event)."""
  assert log_det.shape in ([], leading), f'log-det shape {log_det.shape}, expected {leading}'


@pytest.fixture
def case_and_bijector(request, float64):
  case = CASES[request.param]
  bijector = case.make()
  assert type(bijector) is case.cls  # pylint: disable=unidiomatic-typecheck
  x, condition = _inputs(case, [BATCH])
  bijector.forward_and_log_det(x, **condition)   # builds the layers
  return case, bijector


def _cases(**filters):
  return pytest.mark.parametrize('case_and_bijector', sorted(
      name for name, case in CASES.items()
      if all(getattr(case, k) is not None for k in filters)), indirect=True)


# -- shapes: one event, one batch axis, two leading axes ------------------------------------
@_cases()
def test_any_number_of_leading_axes(case_and_bijector):
  case, b = case_and_bijector
  x, condition = _inputs(case, [BATCH])
  y, fldj = b.forward_and_log_det(x, **condition)
  x_back, ildj = b.inverse_and_log_det(y, **condition)
  _assert_close(x_back, x, atol=1e-9)
  np.testing.assert_allclose(np.broadcast_to(fldj, [BATCH]), -np.broadcast_to(ildj, [BATCH]),
                             atol=1e-9)
  # One event: x[0] maps as in the batch, with a scalar log-det.
  y0, fldj0 = b.forward_and_log_det(_index(x, 0), **_index(condition, 0))
  _assert_close(y0, _index(y, 0))
  assert fldj0.shape == []
  np.testing.assert_allclose(fldj0, np.broadcast_to(fldj, [BATCH])[0], atol=1e-10)
  x0, ildj0 = b.inverse_and_log_det(_index(y, 0), **_index(condition, 0))
  _assert_close(x0, _index(x, 0), atol=1e-9)
  assert ildj0.shape == []
  # Two leading axes [2, 3]: the flat batch, reshaped.
  x2, c2, y2 = _reshape(x, [2, 3]), _reshape(condition, [2, 3]), _reshape(y, [2, 3])
  y_2, fldj2 = b.forward_and_log_det(x2, **c2)
  _assert_close(y_2, y2)
  _check_log_det(fldj2, [2, 3])
  np.testing.assert_allclose(np.broadcast_to(fldj2, [2, 3]),
                             np.reshape(np.broadcast_to(fldj, [BATCH]), [2, 3]), atol=1e-10)
  x_2, ildj2 = b.inverse_and_log_det(y2, **c2)
  _assert_close(x_2, x2, atol=1e-9)
  _check_log_det(ildj2, [2, 3])


@pytest.mark.parametrize('jit_compile', [False, True])
@_cases()
def test_unknown_leading_axes_in_a_graph(case_and_bijector, jit_compile):
  """Under tf.function (and XLA) with unknown leading axes, and for one event: forward and
  inverse give the eager numbers."""
  case, b = case_and_bijector
  x, condition = _inputs(case, [2, 3], seed=2)
  y, fldj = b.forward_and_log_det(x, **condition)

  def spec(structure):
    return tf.nest.map_structure(
        lambda t: tf.TensorSpec([None, None] + t.shape[2:], t.dtype), structure)

  forward = tf.function(lambda t, c: b.forward_and_log_det(t, **c),
                        input_signature=[spec(x), spec(condition)], jit_compile=jit_compile)
  y_graph, fldj_graph = forward(x, condition)
  _assert_close(y_graph, y, atol=1e-9)
  np.testing.assert_allclose(np.broadcast_to(fldj_graph, [2, 3]), np.broadcast_to(fldj, [2, 3]),
                             atol=1e-9)
  inverse = tf.function(lambda t, c: b.inverse_and_log_det(t, **c),
                        input_signature=[spec(y), spec(condition)], jit_compile=jit_compile)
  x_graph, ildj_graph = inverse(y, condition)
  _assert_close(x_graph, x, atol=1e-8)
  np.testing.assert_allclose(np.broadcast_to(ildj_graph, [2, 3]), -np.broadcast_to(fldj, [2, 3]),
                             atol=1e-8)
  one = _index(_index(x, 0), 1), _index(_index(condition, 0), 1)
  y0, fldj0 = tf.function(lambda t, c: b.forward_and_log_det(t, **c),
                          jit_compile=jit_compile)(*one)
  _assert_close(y0, _index(_index(y, 0), 1), atol=1e-9)
  assert fldj0.shape == []


@_cases()
def test_tfp_methods(case_and_bijector):
  case, b = case_and_bijector
  x, condition = _inputs(case, [2, 3], seed=1)
  y, fldj = b.forward_and_log_det(x, **condition)
  _assert_close(b.forward(x, **condition), y)
  _assert_close(b.inverse(y, **condition), x, atol=1e-9)
  tfp_fldj = b.forward_log_det_jacobian(x, **condition)
  tfp_ildj = b.inverse_log_det_jacobian(y, **condition)
  np.testing.assert_allclose(np.broadcast_to(tfp_fldj, [2, 3]), np.broadcast_to(fldj, [2, 3]),
                             atol=1e-10)
  np.testing.assert_allclose(np.broadcast_to(tfp_ildj, [2, 3]), -np.broadcast_to(fldj, [2, 3]),
                             atol=1e-9)
  assert tfp_fldj.shape == [2, 3] and tfp_ildj.shape == [2, 3]
  one = b.forward_log_det_jacobian(_index(_index(x, 0), 0), **_index(_index(condition, 0), 0))
  assert one.shape == []


@_cases()
def test_event_shape_methods_match_outputs(case_and_bijector):
  case, b = case_and_bijector
  x, condition = _inputs(case, [2, 3])
  y = b.forward(x, **condition)
  x_event = tf.nest.map_structure(lambda t: t.shape[2:], x)
  y_event = tf.nest.map_structure(lambda t: t.shape[2:], y)
  x_full = tf.nest.map_structure(lambda t: t.shape, x)
  y_full = tf.nest.map_structure(lambda t: t.shape, y)
  for shape_in, expected, fn in [(x_event, y_event, b.forward_event_shape),
                                 (x_full, y_full, b.forward_event_shape),
                                 (y_event, x_event, b.inverse_event_shape),
                                 (y_full, x_full, b.inverse_event_shape)]:
    got = fn(shape_in)
    assert tf.nest.flatten(got) == tf.nest.flatten(expected)
    as_tensor = tf.nest.map_structure(lambda s: tf.constant(s.as_list(), tf.int32), shape_in,
                                      expand_composites=False)
    tensor_fn = (b.forward_event_shape_tensor if fn == b.forward_event_shape
                 else b.inverse_event_shape_tensor)
    got_tensor = tensor_fn(as_tensor)
    assert [list(np.asarray(t)) for t in tf.nest.flatten(got_tensor)] == [
        s.as_list() for s in tf.nest.flatten(expected)]


# -- variables and batch shape ----------------------------------------------------------------
def _ids(variables):
  return sorted(id(v) for v in variables)


@_cases()
def test_variables_are_the_declared_keras_weights(case_and_bijector):
  _, b = case_and_bijector
  weights = [w for layer in b.layers for w in layer.weights]
  trainable = [w.value for w in weights if w.trainable]
  assert _ids(b.trainable_variables) == _ids({id(v): v for v in trainable}.values())
  assert _ids(b.variables) == _ids({id(w.value): w.value for w in weights}.values())
  assert all(isinstance(v, tf.Variable) for v in b.variables)
  holder = tf.Module()
  holder.bijector = b
  holder.inverted = tfb.Invert(b)
  assert _ids(holder.trainable_variables) == _ids(b.trainable_variables)


def test_undeclared_layers_are_not_variables(float64):
  """A layer a bijector holds but does not declare (e.g. a template whose values are replaced
  at call time) is invisible to the variable walk, directly and through a distribution."""
  b = _coupling(2)
  b.forward(tf.ones([1, 2, 2, 2], tf.float64))
  template = keras.layers.Dense(3)
  template.build((None, 2))
  b.template = template
  b.template_bijector = _coupling(2)
  b.template_bijector.forward(tf.ones([1, 2, 2, 2], tf.float64))
  expected = _ids(w.value for w in b.conditioner.trainable_weights)
  assert _ids(b.trainable_variables) == expected
  dist = tfp.distributions.TransformedDistribution(
      tfp.distributions.Sample(tfp.distributions.Normal(tf.constant(0., tf.float64), 1.),
                               [2, 2, 2]), b)
  assert _ids(dist.trainable_variables) == expected


@_cases()
def test_batch_shape_is_empty(case_and_bijector):
  _, b = case_and_bijector
  assert b.experimental_batch_shape() == []
  assert list(b.experimental_batch_shape_tensor()) == []


@_cases()
def test_constant_jacobians_are_declared(case_and_bijector):
  case, b = case_and_bijector
  assert b.is_constant_jacobian == (case.cls in CONSTANT_JACOBIAN)
  if b.is_constant_jacobian:
    x1, c1 = _inputs(case, [2], seed=5)
    x2, c2 = _inputs(case, [2], seed=6)
    np.testing.assert_allclose(np.broadcast_to(b.forward_and_log_det(x1, **c1)[1], [2]),
                               np.broadcast_to(b.forward_and_log_det(x2, **c2)[1], [2]),
                               atol=1e-10)


# -- the inverse is differentiable ------------------------------------------------------------
def _output_and_jacobian(fn, structure, **condition):
  """fn(structure, **condition)[0] and its Jacobian [output size, input size] (all parts of
  the input and output structures flattened, one event)."""
  out, _ = fn(structure, **condition)
  return out, flow_checks.autodiff_jacobian(lambda s: fn(s, **condition)[0], structure)


@_cases()
def test_log_det_and_inverse_match_the_autodiff_jacobians(case_and_bijector):
  """For one event: the forward log-det is log|det J_forward(x)| (maps whose output has the
  size of x; an augmented map's log-det includes the noise, tests/test_denseflow.py checks it
  on the joint Jacobian), and J_inverse(y) . J_forward(x) = identity (the inverse has
  gradients)."""
  case, b = case_and_bijector
  x, condition = _inputs(case, [], seed=7)
  y, j_forward = _output_and_jacobian(b.forward_and_log_det, x, **condition)
  _, j_inverse = _output_and_jacobian(b.inverse_and_log_det, y, **condition)
  np.testing.assert_allclose(j_inverse @ j_forward, np.eye(j_inverse.shape[0]), atol=1e-8)
  if j_forward.shape[0] == j_forward.shape[1]:
    _, log_abs_det = np.linalg.slogdet(j_forward)
    fldj = b.forward_and_log_det(x, **condition)[1]
    np.testing.assert_allclose(fldj, log_abs_det, atol=1e-8, rtol=1e-8)


# -- errors -----------------------------------------------------------------------------------
@_cases()
def test_wrong_rank_raises(case_and_bijector):
  _, b = case_and_bijector
  with pytest.raises(ValueError, match='rank 3|event shape|expected'):
    b.forward_and_log_det(tf.zeros([4, 4], tf.float64))


@_cases(channels=True)
def test_wrong_channels_raise(case_and_bijector):
  case, b = case_and_bijector
  wrong = tf.zeros([2] + list(case.shape[:-1]) + [case.channels + 1], tf.float64)
  _, condition = _inputs(case, [2])
  for method in (b.forward_and_log_det, b.inverse_and_log_det):
    with pytest.raises(ValueError, match=f'expected {case.channels} channels'):
      method(wrong, **condition)


# ============================================================== model families
FAMILIES = {
    'glow': dict(model='glow', num_levels=2, steps_per_level=1, width=8),
    'realnvp': dict(model='realnvp', num_scales=2, res_blocks=1, base_width=4),
    'lcma': dict(model='realnvp', num_scales=2, res_blocks=1, base_width=4, split='lcma'),
    'denseflow': dict(model='denseflow', block_conf=(2, 1), layers_conf=(1, 1),
                      layer_mid_channels=(4, 4), growth_rate=2, dense_layers=1, dense_growth=4,
                      num_landmarks=1, dequantization='variational', split_prior='learned'),
    'marscf': dict(model='marscf', num_levels=2, steps_per_level=1, width=8, mar_hidden=4,
                   mar_layers=1, coupling='mixlogcdf', num_components=3, coupling_blocks=1,
                   attention_heads=2, dropout=0.),
}
IMAGE_SHAPE = (8, 8, 1)


def _config(family, tmp_path_factory):
  fields = dict(FAMILIES[family], image_shape=IMAGE_SHAPE)
  if fields.get('split') == 'lcma':
    path = tmp_path_factory.mktemp('masks') / 'masks.npz'
    contributions = np.random.default_rng(0).standard_normal((1, int(np.prod(IMAGE_SHAPE))))
    split_permutations.write_masks(path, contributions, image_shape=IMAGE_SHAPE)
    fields['lcma_masks'] = str(path)
  return tfflows.FlowConfig(**fields)


def _images(n=2, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n,) + IMAGE_SHAPE).astype(np.uint8)


def _initialise(model, images):
  """ActNorm's data-dependent initialisation on a batch, then every weight moved off its
  (often zero) initial value, so gradients reach every layer."""
  model.initialize(images)
  rng = np.random.default_rng(4)
  for w in model.trainable_weights:
    w.assign(w.numpy() + 0.01 * rng.standard_normal(w.shape))
  return model


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  keras.utils.set_random_seed(0)
  model = tfflows.build_model(_config(request.param, tmp_path_factory))
  return request.param, _initialise(model, _images(4))


def _distribution_inputs(model, leading, seed=0):
  """Dequantized images (and for augmented flows noise), with the given leading axes."""
  n = int(np.prod(leading)) if leading else 1
  values = tf.cast(_images(n, seed), model.flow_dtype) + 0.5
  x = [values] + [tf.random.stateless_normal((n,) + s, [seed, k], dtype=model.flow_dtype)
                  for k, s in enumerate(model.flow.noise_shapes)]
  x = x if model.flow.is_augmented else x[0]
  return tf.nest.map_structure(
      lambda t: tf.reshape(t, list(leading) + t.shape[1:].as_list()), x)


def test_distribution_samples_any_shape(family):
  _, model = family
  dist = model.distribution
  one = dist.sample(seed=1)
  many = dist.sample([2, 3], seed=2)
  assert [t.shape for t in tf.nest.flatten(one)] == tf.nest.flatten(dist.event_shape)
  assert [t.shape for t in tf.nest.flatten(many)] == [
      tf.TensorShape([2, 3]).concatenate(s) for s in tf.nest.flatten(dist.event_shape)]
  assert tf.nest.flatten(dist.event_shape)[0] == IMAGE_SHAPE


def test_distribution_log_prob_any_leading_axes(family):
  _, model = family
  dist = model.distribution
  x = _distribution_inputs(model, [2, 3])
  log_prob = dist.log_prob(x)
  assert log_prob.shape == [2, 3]
  flat = dist.log_prob(_distribution_inputs(model, [6]))
  np.testing.assert_allclose(np.reshape(log_prob, [6]), flat, rtol=1e-5, atol=1e-3)
  one = dist.log_prob(_index(_index(x, 1), 2))
  assert one.shape == []
  np.testing.assert_allclose(one, log_prob[1, 2], rtol=1e-5, atol=1e-3)
  # The training path (contexts from the forward pass) gives the same numbers.
  flat_x = _distribution_inputs(model, [6])
  image, noise = (flat_x[0], flat_x[1:]) if model.flow.is_augmented else (flat_x, [])
  latents, contexts, log_det = model.flow.encode(image, noise)
  fast = joint.prior_log_prob(model.priors, latents, contexts) + log_det
  np.testing.assert_allclose(flat, fast, rtol=1e-5, atol=1e-2)


def test_distribution_batch_and_event_shapes(family):
  _, model = family
  dist = model.distribution
  assert dist.batch_shape == []
  assert list(dist.batch_shape_tensor()) == []
  flow = model.flow
  x = _distribution_inputs(model, [5])
  latents = flow.forward(x)
  shapes = flow.forward_event_shape(tf.nest.map_structure(lambda t: t.shape, x))
  assert [z.shape for z in latents] == list(shapes)
  assert flow.inverse_event_shape(flow.latent_shapes) == tf.nest.map_structure(
      lambda t: t.shape[1:], x)
  with pytest.raises(ValueError, match='event shape'):
    flow.forward_event_shape([4, 4, 1] if not flow.is_augmented else [[4, 4, 1]] + [
        list(s) for s in flow.noise_shapes])


def test_distribution_variables_are_the_model_weights(family):
  name, model = family
  dequantizer = {id(w) for w in model.dequantizer.weights}
  expected = [w.value for w in model.trainable_weights if id(w) not in dequantizer]
  variables = model.distribution.trainable_variables
  assert _ids(variables) == _ids(expected)
  if name == 'glow':   # the Glow: 33 weights, none held by a dequantizer (each level's
    # coupling network: 2 bias-free hidden kernels and 2 ActNorms of loc and log-scale)
    assert len(variables) == 33 == len(model.trainable_weights)


def test_decode_of_partial_latents_names_what_is_expected(family):
  _, model = family
  latents = model.encode(_images(2))
  count = len(latents)
  with pytest.raises(ValueError, match=rf'expected {count} latents, ordered top-down'):
    model.decode(latents[:1])
  with pytest.raises(ValueError, match='a list of'):
    model.decode(latents[0])
  with pytest.raises(ValueError, match=r'latent 0 \(top-down\) has shape'):
    model.decode([z[0] for z in latents])
  with pytest.raises(ValueError, match=rf'expected {count} latents, ordered top-down'):
    model.flow.inverse(latents[:1])
  with pytest.raises(ValueError, match='expected'):
    model.flow.forward(tf.zeros([2, 8, 8, 2]))


# -- float64 and training through the distribution -----------------------------------------
@pytest.mark.parametrize('name', [n if n != 'lcma' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(FAMILIES)])
def test_float64_model_and_distribution_gradients(name, float64, tmp_path_factory):
  """Every family builds and runs in float64; the gradient of the distribution's log_prob with
  respect to ``dist.trainable_variables`` equals the training path's, weight by weight.
  (LCMA is RealNVP with fixed split permutations: slow-marked to keep the default run short.)"""
  keras.utils.set_random_seed(0)
  model = _initialise(tfflows.build_model(_config(name, tmp_path_factory)), _images(4))
  assert model.flow_dtype == tf.float64
  images = _images(2, seed=3)
  log_prob = model.log_prob(images, seed=1)
  assert log_prob.dtype == tf.float64 and np.all(np.isfinite(log_prob))
  assert model.sample(1, seed=2).shape == (1,) + IMAGE_SHAPE
  dist = model.distribution
  x = _distribution_inputs(model, [2], seed=3)
  image, noise = (x[0], x[1:]) if model.flow.is_augmented else (x, [])
  variables = list(dist.trainable_variables)
  with tf.GradientTape(persistent=True) as tape:
    through_dist = tf.reduce_sum(dist.log_prob(x))
    latents, contexts, log_det = model.flow.encode(image, noise)
    training_path = tf.reduce_sum(joint.prior_log_prob(model.priors, latents, contexts)
                                  + log_det)
  assert through_dist.dtype == tf.float64
  np.testing.assert_allclose(through_dist, training_path, rtol=1e-10)
  g_dist = tape.gradient(through_dist, variables)
  g_train = tape.gradient(training_path, variables)
  for v, a, b in zip(variables, g_dist, g_train):
    if a is None or b is None:
      assert a is None and b is None, v.name
      continue
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=v.name)


def test_an_optimizer_step_through_the_distribution_trains_the_model():
  """The ordinary TFP pattern: a tape over dist.log_prob and an optimizer over
  dist.trainable_variables moves the model's weights exactly as the same step on the model's
  own weights would."""
  keras.utils.set_random_seed(0)
  model = _initialise(tfflows.build_model(_config('glow', None)), _images(4))
  dist = model.distribution
  x = _distribution_inputs(model, [2], seed=5)
  before = [w.numpy() for w in model.trainable_weights]
  with tf.GradientTape() as tape:
    latents, contexts, log_det = model.flow.encode(x)
    loss = -tf.reduce_mean(joint.prior_log_prob(model.priors, latents, contexts) + log_det)
  expected = [b - 0.1 * g.numpy()
              for b, g in zip(before, tape.gradient(loss, model.trainable_weights))]
  optimizer = keras.optimizers.SGD(0.1)
  with tf.GradientTape() as tape:
    loss = -tf.reduce_mean(dist.log_prob(x))
  variables = dist.trainable_variables
  optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
  for w, e, b in zip(model.trainable_weights, expected, before):
    np.testing.assert_allclose(w.numpy(), e, rtol=1e-4, atol=1e-6, err_msg=w.path)
  assert sum(not np.array_equal(w.numpy(), b) for w, b in zip(model.trainable_weights, before)) \
      == len(before)


# -- mixed-precision policies --------------------------------------------------------------
@pytest.fixture
def restore_policy():
  """Restores the global Keras dtype policy a test changes."""
  previous = keras.config.dtype_policy()
  yield
  keras.config.set_dtype_policy(previous)


def _layer_policies(model):
  """(layer class, dtype policy) of every layer of a model, in a fixed order, the networks that
  repeated steps run (their template layers) included."""
  layers = list(model._flatten_layers())  # pylint: disable=protected-access
  for steps in repeated.find_repeated(model.flow):
    layers += [l for t in steps.stacked.template_layers
               for l in t._flatten_layers()]  # pylint: disable=protected-access
  return [(type(l).__name__, l.dtype_policy.name) for l in layers]


def _mixed_precision_model(name, policy, tmp_path_factory, **fields):
  """The family's tiny model built under the global Keras ``policy`` (restored after), with
  the same weights for every call: every trainable weight moved off its (often zero) initial
  value, so every network changes the numbers."""
  keras.utils.set_random_seed(0)
  config = _config(name, tmp_path_factory).replace(**fields)
  keras.config.set_dtype_policy(policy)
  try:
    model = tfflows.build_model(config)
    assert keras.config.dtype_policy().name == policy   # build_model leaves it as it was
  finally:
    keras.config.set_dtype_policy('float32')
  assert model.config == config
  rng = np.random.default_rng(4)
  for w in model.trainable_weights:
    w.assign(w.numpy() + 0.01 * rng.standard_normal(w.shape))
  return model


@pytest.mark.parametrize('name, policy', [  # (LCMA builds RealNVP's networks; float16 on a CPU
    # is slow, so one cheap family checks it)
    ('glow', 'mixed_bfloat16'), ('realnvp', 'mixed_bfloat16'), ('denseflow', 'mixed_bfloat16'),
    ('marscf', 'mixed_bfloat16'), ('glow', 'mixed_float16')])
def test_mixed_policy_gives_what_conditioner_precision_gives(name, policy, tmp_path_factory,
                                                              restore_policy):
  """Under a global mixed Keras policy every family builds, its networks compute in the
  policy's dtype and everything else in float32, exactly as with conditioner_precision set to
  that dtype: the same layer policies, float32 variables and the same log-likelihood bit for
  bit."""
  compute = keras.dtype_policies.get(policy).compute_dtype
  mixed = _mixed_precision_model(name, policy, tmp_path_factory)
  asked = _mixed_precision_model(name, 'float32', tmp_path_factory,
                                 conditioner_precision=compute)
  assert mixed.network_precision == asked.network_precision == compute
  policies = _layer_policies(mixed)
  assert policies == _layer_policies(asked)
  assert {p for _, p in policies} == {'float32', policy}
  assert all(p.dtype_policy.name == 'float32' for p in mixed.priors)
  assert {v.dtype for v in mixed.variables if 'float' in v.dtype} == {'float32'}
  assert mixed.flow_dtype == tf.float32
  images = _images(3, seed=9)
  seed = tf.constant([1, 2])   # the same noise for both (eager: no tracing, seconds)
  log_w = mixed(tf.cast(images, tf.float32), training=False, seed=seed)
  assert log_w.dtype == tf.float32 and np.all(np.isfinite(log_w))
  np.testing.assert_array_equal(log_w, asked(tf.cast(images, tf.float32), training=False,
                                             seed=seed))
  np.testing.assert_array_equal(mixed.decode(mixed.encode(images)), images)


def test_contradicting_precision_and_mixed_policy_is_refused(restore_policy):
  config = _config('glow', None).replace(conditioner_precision='float32')
  keras.config.set_dtype_policy('mixed_bfloat16')
  with pytest.raises(ValueError, match="conditioner_precision='float32' contradicts the global "
                                       "Keras dtype policy 'mixed_bfloat16'"):
    tfflows.build_model(config)
  assert keras.config.dtype_policy().name == 'mixed_bfloat16'
