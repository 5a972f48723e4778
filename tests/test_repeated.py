"""Repeated steps as one loop over stacked weights (bijectors.repeated) against separate steps.

The reference is what the loop replaces: K steps built separately by the same ``make_step``,
each holding its own variables, with slice k of every stacked weight assigned to step k's
variables, run one after the other (``SeparateSteps``; for a whole model, the model built with
``SeparateSteps`` in place of ``Repeated``, whose variables are in the layout of the checkpoints
written before the loops existed). Loop, remat loop and reference must agree for K = 1, 2, 3:
outputs, log-dets, inverse, gradients, batch-norm statistics and dropout seeds after a training
pass, and, for every model family, ActNorm's data-dependent initialisation. Then per-step
parity, the conversion of an unrolled-layout checkpoint, retired config fields and the ``auto``
precision decision.
"""

import json
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import bijectors as fb
import tfflows
from bijectors import base
from bijectors import repeated
from tfflows import atomic
from tfflows.nn import precision
from train import checkpoint_contents
from train import checkpoints
from train import convert_checkpoint

IMAGE_SHAPE = (8, 8, 1)
# Groups of 1, 2 and 3 steps (DenseFlow's units have 2 and 1; Glow's, mAR-SCF's levels 3).
FAMILIES = {
    'glow': dict(model='glow', image_shape=IMAGE_SHAPE, num_levels=2, steps_per_level=3,
                 width=8),
    'realnvp': dict(model='realnvp', image_shape=IMAGE_SHAPE, num_scales=2, res_blocks=1,
                    base_width=4),
    'denseflow': dict(model='denseflow', image_shape=IMAGE_SHAPE, block_conf=(2, 1),
                      layers_conf=(2, 1), layer_mid_channels=(8, 8), growth_rate=2,
                      dense_layers=1, dense_growth=4, split_prior='standard',
                      dequantization='uniform', conditioner_precision='float32'),
    'marscf': dict(model='marscf', image_shape=IMAGE_SHAPE, num_levels=2, steps_per_level=3,
                   width=8, coupling='mixlogcdf', num_components=2, coupling_blocks=1,
                   attention_heads=2, mar_hidden=4, mar_layers=1),
}


class SeparateSteps(base.Chain):
  """The reference: ``make_step(0) .. make_step(K-1)`` built separately, each with its own
  variables, run in order, step k with the k-th ``step_kwargs`` (``Repeated``'s signature)."""

  def __init__(self, make_step, num_steps, event_shape=None, remat=False, step_kwargs=None,
               name='repeated'):
    del event_shape, remat
    self.kwargs = [{key: np.asarray(v)[k] for key, v in (step_kwargs or {}).items()}
                   for k in range(num_steps)]
    super().__init__([make_step(k) for k in range(num_steps)], name=name)

  def _forward_and_log_det(self, x, **condition):
    total = 0.
    for step, kwargs in zip(self.bijectors, self.kwargs):
      x, ldj = step.forward_and_log_det(x, **kwargs, **condition)
      total = total + ldj
    return x, total

  def _inverse_and_log_det(self, y, **condition):
    total = 0.
    for step, kwargs in zip(reversed(self.bijectors), reversed(self.kwargs)):
      y, ldj = step.inverse_and_log_det(y, **kwargs, **condition)
      total = total + ldj
    return y, total


def _images(n=4, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (n,) + IMAGE_SHAPE).astype(np.uint8)


def _perturb(variables, seed=1):
  """Moves trainable weights off their (often zero) initial values."""
  rng = np.random.RandomState(seed)
  for v in variables:
    v.assign(v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype))


def _pair(name, **changes):
  """(reference model with separate steps, loop model) with the same weights (the loop model's,
  perturbed off their zero initialisations, slice k copied to step k), neither initialised."""
  config = tfflows.FlowConfig(**{**FAMILIES[name], **changes})
  looped = tfflows.build_model(config)
  with mock.patch.object(repeated, 'Repeated', SeparateSteps):
    reference = tfflows.build_model(config.replace(remat='none'))
  _perturb(looped.trainable_variables)
  layout = checkpoint_contents.unrolled_variable_layout(looped)
  assert len(layout) == len(reference.variables)
  for (mine, k), v in zip(layout, reference.variables):
    v.assign(mine if k is None else mine[k])
  return reference, looped


def _assert_same_variables(reference, looped, atol=0.):
  """Every variable of the reference model equals its counterpart in the loop layout."""
  layout = checkpoint_contents.unrolled_variable_layout(looped)
  assert len(layout) == len(reference.variables)
  for (mine, k), v in zip(layout, reference.variables):
    value = mine.numpy() if k is None else mine.numpy()[k]
    assert value.shape == tuple(v.shape), v.path
    np.testing.assert_allclose(value, v.numpy(), atol=atol, rtol=0, err_msg=v.path)


def _gradients(model, images, seed=(1, 2)):
  x = tf.constant(images, tf.float32)
  with tf.GradientTape() as tape:
    loss = -tf.reduce_mean(model(x, training=True, seed=tf.constant(seed)))
  known = {id(v) for v in model.variables} | {id(getattr(v, 'value', v)) for v in model.variables}
  hidden = [v.name for v in tape.watched_variables() if id(v) not in known]
  assert not hidden, f'variables outside the Keras model were read: {hidden}'
  return loss, tape.gradient(loss, model.trainable_variables)


def _as_unrolled(looped, grads):
  """Gradients of a loop-layout model in the unrolled layout's order (trainable only)."""
  by_id = {id(v): np.asarray(tf.convert_to_tensor(g)) for v, g in
           zip(looped.trainable_variables, grads)}
  return [by_id[id(v)] if k is None else by_id[id(v)][k]
          for v, k in checkpoint_contents.unrolled_variable_layout(looped) if v.trainable]


def _assert_close_gradients(mine, reference, rtol):
  """Per tensor, relative to the largest gradient overall (some are zero up to rounding, e.g.
  the attention key bias, to which softmax is invariant)."""
  scale = max(float(np.max(np.abs(g))) for g in reference)
  for a, b in zip(mine, reference):
    np.testing.assert_allclose(a, np.asarray(b), atol=rtol * scale, rtol=0)


# -- one group of steps -------------------------------------------------------------------------
class _StepLayer(keras.layers.Layer):
  """Runs a bijector inside a Keras call, so that ``training`` reaches its networks."""

  def __init__(self, bijector, **kwargs):
    super().__init__(**kwargs)
    self.bijector = bijector
    self.owned = bijector.layers

  def build(self, input_shape):
    del input_shape

  def call(self, x, training=None):
    return self.bijector.forward_and_log_det(x)


def _noisy_step(k):
  """ActNorm -> 1x1 conv -> affine coupling whose conditioner has batch norm and dropout (built
  on first call: Repeated builds it with one inverse pass)."""
  net = keras.Sequential([keras.layers.Conv2D(8, 3, padding='same'),
                          keras.layers.BatchNormalization(), keras.layers.Dropout(0.3),
                          keras.layers.Conv2D(4, 3, padding='same')], name=f'net{k}')
  return fb.Chain([fb.ActNorm(4, name=f'actnorm{k}'),
                   fb.InvertibleConv1x1(4, 'plain', name=f'conv{k}'),
                   fb.AffineCoupling(net, 4, scale_fn='exp_tanh', name=f'coupling{k}')])


def _loop_and_reference(num_steps, remat):
  """A Repeated of ``_noisy_step``s (weights perturbed) and the separately built steps with
  slice k of every stacked weight assigned to step k's variables."""
  loop = repeated.Repeated(_noisy_step, num_steps, event_shape=(4, 4, 4), remat=remat)
  _perturb([w for w in loop.stacked.ordered if w.trainable])
  steps = SeparateSteps(_noisy_step, num_steps)
  steps.inverse_and_log_det(tf.zeros((1, 4, 4, 4)))   # builds the steps' layers
  for k, step in enumerate(steps.bijectors):
    variables = repeated.step_variables(step)
    assert len(variables) == len(loop.stacked.ordered)
    for v, w in zip(variables, loop.stacked.ordered):
      v.assign(w[k])
  return loop, steps


def _slices(steps, j):
  """Variable j of every separate step, stacked [K, ...] (the reference's stacked weight j)."""
  return np.stack([repeated.step_variables(s)[j].numpy() for s in steps.bijectors])


@pytest.mark.parametrize('num_steps, remat, jit_compile', [
    (1, False, False), (2, False, False), (3, False, False), (1, True, False),
    (2, True, False), (3, True, False), (3, False, True), (3, True, True)])
def test_loop_equals_separate_steps(num_steps, remat, jit_compile):
  """Loop (and remat loop) == K separately built steps with the slices' values: outputs,
  log-dets and gradients of a training pass (batch norm in training mode, dropout with each
  step's seeds, also in remat's recomputation), the batch-norm statistics and seed states it
  updates, and the inverse."""
  loop, steps = _loop_and_reference(num_steps, remat)
  trainable = [j for j, w in enumerate(loop.stacked.ordered) if w.trainable]
  x = tf.constant(np.random.RandomState(2).standard_normal([3, 4, 4, 4]), tf.float32)

  def training_pass(bijector, weights):
    layer = _StepLayer(bijector, name='steps')

    def step(x):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y, log_det = layer(x, training=True)
        loss = tf.reduce_sum(y ** 2) + tf.reduce_sum(log_det)
      return y, log_det, tape.gradient(loss, [x] + weights)
    return tf.function(step, jit_compile=jit_compile)(x)

  y_l, ldj_l, grads_l = training_pass(loop, [loop.stacked.ordered[j] for j in trainable])
  separate = [repeated.step_variables(s)[j] for s in steps.bijectors for j in trainable]
  y_s, ldj_s, grads_s = training_pass(steps, separate)
  np.testing.assert_allclose(y_l, y_s, atol=1e-5)
  np.testing.assert_allclose(ldj_l, ldj_s, rtol=1e-5)
  # The reference's gradients (step-major) regrouped per stacked weight [K, ...].
  per_step = np.array(grads_s[1:], dtype=object).reshape(num_steps, len(trainable))
  stacked_s = [np.stack([np.asarray(g) for g in per_step[:, i]]) for i in range(len(trainable))]
  _assert_close_gradients([np.asarray(g) for g in grads_l], [grads_s[0]] + stacked_s, 1e-5)
  for j, w in enumerate(loop.stacked.ordered):   # batch-norm statistics, seed states
    np.testing.assert_allclose(w.numpy(), _slices(steps, j), atol=1e-6, err_msg=w.path)
  moving = [w for w in loop.stacked.ordered if 'moving_variance' in w.path]
  assert moving and np.all(moving[0].numpy() != 1.)   # the statistics were updated
  x_l, ildj_l = loop.inverse_and_log_det(y_s)
  x_s, ildj_s = steps.inverse_and_log_det(y_s)
  np.testing.assert_allclose(x_l, x_s, atol=1e-5)
  np.testing.assert_allclose(ildj_l, ildj_s, rtol=1e-5)


def test_step_kwargs_reach_each_step():
  """step_kwargs: step k of the loop gets the k-th value (RealNVP's parity 0, 1, 0), as the
  separately built couplings with a fixed parity do."""
  def make_step(k):
    net = keras.Sequential([keras.layers.Conv2D(
        fb.AffineCoupling.conditioner_channels(4, 'channel'), 3, padding='same',
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.1))], name=f'net{k}')
    return fb.AffineCoupling(net, 4, mask='channel', parity=k % 2, scale_fn='exp_tanh',
                             name=f'coupling{k}')
  kwargs = {'parity': [0, 1, 0]}
  loop = repeated.Repeated(make_step, 3, event_shape=(4, 4, 4), step_kwargs=kwargs)
  steps = SeparateSteps(make_step, 3)   # the parity fixed when each coupling is built
  steps.inverse_and_log_det(tf.zeros((1, 4, 4, 4)))
  for k, step in enumerate(steps.bijectors):
    for v, w in zip(repeated.step_variables(step), loop.stacked.ordered):
      v.assign(w[k])
  x = tf.random.normal([2, 4, 4, 4])
  for a, b in zip(loop.forward_and_log_det(x), steps.forward_and_log_det(x)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match='needs 3 values'):
    repeated.Repeated(make_step, 3, event_shape=(4, 4, 4), step_kwargs={'parity': [0, 1]})


# -- whole models -------------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_loop_equals_separate_steps_in_models(name):
  """ActNorm initialisation, log-weight (forward and log-det), decode (inverse), gradients and
  the batch-norm statistics / dropout seeds a training pass updates: loop == separate steps."""
  reference, looped = _pair(name)
  assert repeated.find_repeated(looped.flow)
  assert len(looped.variables) < len(reference.variables)
  assert repeated.has_while_loops(looped) and not repeated.has_while_loops(reference)
  images = _images()
  reference.initialize(images)
  looped.initialize(images)
  assert looped.is_initialized
  _assert_same_variables(reference, looped, atol=1e-6)   # ActNorm (and BN) after initialisation
  x = tf.constant(images, tf.float32)
  np.testing.assert_allclose(looped.log_weight(x, midpoint=True),
                             reference.log_weight(x, midpoint=True), rtol=1e-6)
  latents = reference.encode(images)
  for a, b in zip(looped.encode(images), latents):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_array_equal(looped.decode(latents), reference.decode(latents))
  loss_r, grads_r = _gradients(reference, images)
  loss_l, grads_l = _gradients(looped, images)
  np.testing.assert_allclose(loss_l, loss_r, rtol=1e-6)
  _assert_close_gradients(_as_unrolled(looped, grads_l), grads_r, rtol=1e-5)
  _assert_same_variables(reference, looped, atol=1e-5)   # BN statistics, seed states


def test_loop_equals_separate_steps_compiled():
  """The loop under tf.function with XLA: the training gradients (at the bin centres, so no
  noise is drawn: XLA draws other random numbers than eager mode) and the inverse equal the
  eager reference model's."""
  reference, looped = _pair('glow')
  images = _images()
  reference.initialize(images)
  looped.initialize(images)

  def gradients(model, x):
    with tf.GradientTape() as tape:
      loss = -tf.reduce_mean(model.log_weight(x, training=True, midpoint=True))
    return loss, tape.gradient(loss, model.trainable_variables)

  x = tf.constant(images, tf.float32)
  loss_l, grads_l = tf.function(lambda x: gradients(looped, x), jit_compile=True)(x)
  loss_r, grads_r = gradients(reference, x)
  np.testing.assert_allclose(loss_l, loss_r, rtol=1e-5)
  _assert_close_gradients(_as_unrolled(looped, grads_l), grads_r, rtol=1e-4)
  latents = reference.encode(images)
  decoded = tf.function(lambda z: looped.flow.decode(z), jit_compile=True)(latents)
  expected = reference.flow.decode(latents)
  np.testing.assert_allclose(decoded[0], expected[0], atol=1e-3)
  np.testing.assert_allclose(decoded[1], expected[1], rtol=1e-5)


def test_remat_model_option():
  """remat='step' reaches every loop of a model and changes none of its numbers."""
  config = tfflows.FlowConfig(**FAMILIES['glow'])
  plain = tfflows.build_model(config)
  remat = tfflows.build_model(config.replace(remat='step'))
  assert all(r.remat for r in repeated.find_repeated(remat.flow))
  for a, b in zip(plain.variables, remat.variables):
    b.assign(a)
  images = _images()
  plain.initialize(images)
  remat.initialize(images)
  loss_p, grads_p = _gradients(plain, images)
  loss_r, grads_r = _gradients(remat, images)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
  _assert_close_gradients([np.asarray(tf.convert_to_tensor(g)) for g in grads_r],
                          [np.asarray(tf.convert_to_tensor(g)) for g in grads_p], rtol=1e-5)


def test_lcma_elementwise_log_det_through_loops():
  """The per-dimension log-det map (LCMA) through looped couplings of alternating parity sums
  to the flow's log-det and equals the map through the separate steps."""
  from tfflows import lcma  # pylint: disable=import-outside-toplevel
  reference, looped = _pair('realnvp', split='none')
  x = tf.constant(_images(), tf.float32) + 0.5
  transform_r = reference.flow.levels[0].transform
  transform_l = looped.flow.levels[0].transform
  y_r, e_r = lcma.forward_and_elementwise_log_det(transform_r, x)
  y_l, e_l = lcma.forward_and_elementwise_log_det(transform_l, x)
  np.testing.assert_allclose(y_l, y_r, atol=1e-5)
  np.testing.assert_allclose(e_l, e_r, atol=1e-4)
  _, log_det = transform_l.forward_and_log_det(x)
  np.testing.assert_allclose(tf.reduce_sum(e_l, [1, 2, 3]), log_det, rtol=1e-5)


@pytest.mark.parametrize('mask, channels', [('checkerboard', 3), ('channel', 4)])
def test_parity_as_data_equals_fixed_parity(mask, channels):
  """A coupling given parity=1 as a tensor is the coupling built with parity 1."""
  net = keras.Sequential([keras.layers.Conv2D(
      fb.AffineCoupling.conditioner_channels(channels, mask), 3, padding='same',
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.1))])
  x = tf.random.normal([2, 4, 4, channels])
  for parity in (0, 1):
    fixed = fb.AffineCoupling(net, channels, mask=mask, parity=parity, scale_fn='exp_tanh')
    data = fb.AffineCoupling(net, channels, mask=mask, parity=0, scale_fn='exp_tanh')
    y, ldj = fixed.forward_and_log_det(x)
    y2, ldj2 = data.forward_and_log_det(x, parity=tf.constant(parity))
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(ldj2, ldj)
    x2, _ = data.inverse_and_log_det(y2, parity=tf.constant(parity))
    np.testing.assert_allclose(x2, x, atol=1e-5)


def test_unrolled_checkpoint_is_refused_then_converted(tmp_path):
  """A training checkpoint of the unrolled layout (one set of variables per step, as written
  before the loops existed; here by the reference model with separate steps) restored into the
  loop layout fails with a message naming the layout and the converter; converted (weights,
  Adamax slots, counters: read from the checkpoint, no unrolled model is built), it restores
  and gives the unrolled model's numbers."""
  from train import trainer  # pylint: disable=import-outside-toplevel
  unrolled, looped = _pair('glow')
  images = _images()
  unrolled.initialize(images)
  optimizer = trainer.make_optimizer('adamax', 1e-3)
  optimizer.build(unrolled.trainable_variables)
  _, grads = _gradients(unrolled, images)
  optimizer.apply_gradients(zip(grads, unrolled.trainable_variables))
  source = checkpoints.Checkpointer(str(tmp_path / 'old'), unrolled, optimizer, keep=1)
  prefix = source.save(step=7, epoch=1)
  with pytest.raises(ValueError, match='unrolled flow steps.*train.convert_checkpoint'):
    checkpoint_contents.restore_model(looped, prefix)
  convert_checkpoint.convert(looped.config, prefix, str(tmp_path / 'new'))
  fresh = tfflows.build_model(looped.config)
  fresh_optimizer = trainer.make_optimizer('adamax', 1e-3)
  fresh_optimizer.build(fresh.trainable_variables)
  target = checkpoints.Checkpointer(str(tmp_path / 'new'), fresh, fresh_optimizer, keep=1)
  assert target.restore_latest().endswith('ckpt-7') and int(target.epoch.numpy()) == 1
  assert int(fresh_optimizer.iterations.numpy()) == 1
  _assert_same_variables(unrolled, fresh)
  _, slots = convert_checkpoint.optimizer_slot_lists(fresh_optimizer)
  _, old_slots = convert_checkpoint.optimizer_slot_lists(optimizer)
  trainable = [(v, k) for v, k in checkpoint_contents.unrolled_variable_layout(fresh)
               if v.trainable]
  index = {id(v): i for i, v in enumerate(fresh.trainable_variables)}
  for new, old in zip(slots, old_slots):
    for (v, k), value in zip(trainable, old):
      mine = new[index[id(v)]].numpy()
      np.testing.assert_array_equal(mine if k is None else mine[k], value.numpy())
  x = tf.constant(images, tf.float32)
  np.testing.assert_allclose(fresh.log_weight(x, midpoint=True),
                             unrolled.log_weight(x, midpoint=True), rtol=1e-6)


@pytest.mark.parametrize('gpus, cpu_flags, expected', [
    ((), ('avx2', 'avx512f', 'avx512_bf16'), 'bfloat16'),
    ((), ('avx2', 'amx_tile', 'amx_bf16'), 'bfloat16'),
    ((), ('avx2', 'avx512f'), 'float32'),
    ((), (), 'float32'),
    (((8, 0),), ('avx2',), 'bfloat16'),
    (((9, 0), (8, 6)), (), 'bfloat16'),
    (((7, 5),), ('avx512_bf16',), 'float32'),      # the networks run on the GPU
    (((8, 0), (7, 0)), (), 'float32'),
])
def test_auto_precision_decision(gpus, cpu_flags, expected):
  assert precision.auto_precision(gpus, cpu_flags) == expected
  assert precision.resolve_precision('auto', (gpus, cpu_flags)) == expected
  assert precision.resolve_precision('float32', (gpus, cpu_flags)) == 'float32'
  # Without oneDNN's kernels a CPU computes bfloat16 slowly; a GPU decides alone.
  assert precision.auto_precision(gpus, cpu_flags, onednn=False) == (
      expected if gpus else 'float32')
  assert precision.resolve_precision('auto', (gpus, cpu_flags, False)) == (
      expected if gpus else 'float32')


def test_auto_precision_keeps_a_float64_policy(float64):
  # 'float32': no policy of the networks' own, so they follow the float64 one.
  assert precision.resolve_precision('auto', ((), ('avx512_bf16',))) == 'float32'
  assert precision.network_policy_name('auto') is None
  with pytest.raises(ValueError, match='conditioner_precision'):
    precision.resolve_precision('int8')


@pytest.mark.parametrize('policy, expected', [('mixed_bfloat16', 'bfloat16'),
                                              ('mixed_float16', 'float16')])
def test_a_mixed_policy_names_the_network_precision(policy, expected):
  """Under a global mixed Keras policy 'auto' (on any hardware) and the policy's own precision
  resolve to it, and another precision is refused, naming both."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(policy)
  try:
    assert precision.resolve_precision('auto', ((), ())) == expected
    assert precision.resolve_precision('auto', ((), ('avx512_bf16',))) == expected
    assert precision.resolve_precision(expected) == expected
    assert precision.network_policy_name('auto') == policy
    other = 'float32'
    with pytest.raises(ValueError, match=f"conditioner_precision='{other}' contradicts the "
                                         f"global Keras dtype policy '{policy}'"):
      precision.resolve_precision(other)
  finally:
    keras.config.set_dtype_policy(previous)


def test_runtime_fields_do_not_block_resuming(tmp_path):
  """A workdir trained without remat and with another precision resumes with --remat=step and
  --conditioner_precision=auto; an architecture field still has to match."""
  from train import checkpoints  # pylint: disable=import-outside-toplevel
  config = tfflows.FlowConfig(**FAMILIES['denseflow'])
  atomic.write_json(str(tmp_path / 'config.json'),
                    config.replace(conditioner_precision='bfloat16').to_dict())
  checkpoints.check_config(str(tmp_path), config.replace(remat='step',
                                                         conditioner_precision='auto'))
  with pytest.raises(Exception, match='growth_rate'):
    checkpoints.check_config(str(tmp_path), config.replace(growth_rate=3))


@pytest.mark.parametrize('step_loop', [True, False])
def test_a_stored_step_loop_field_is_ignored(tmp_path, step_loop):
  """Configs written when step_loop chose between looped and unrolled steps still read (the
  field is retired: the steps always loop, with the same numbers); a checkpoint of unrolled
  steps is refused on restore, naming the converter (test above)."""
  from train import checkpoints  # pylint: disable=import-outside-toplevel
  config = tfflows.FlowConfig(**FAMILIES['glow'])
  stored = {**config.to_dict(), 'step_loop': step_loop}
  assert tfflows.FlowConfig.from_dict(stored) == config
  assert tfflows.FlowConfig.from_json(json.dumps(stored)) == config
  atomic.write_json(str(tmp_path / 'config.json'), stored)
  checkpoints.check_config(str(tmp_path), config)
  assert 'step_loop' not in config.to_dict()
  with pytest.raises(ValueError, match='Unknown config fields: step_loops'):
    tfflows.FlowConfig.from_dict({**config.to_dict(), 'step_loops': True})
