"""LCMA: per-dimension log-dets, the ordered squeeze, the masks file and the two-phase workflow.

Mathematics checked: per-dimension log-dets are the diagonal of the autodiff Jacobian and sum
to the log-det; the split permutations are permutations (invertible, log-det 0) at every
level; on a known contribution pattern LCMA keeps the known half and lcma_reverse its
complement; an LCMA model's log_prob equals the prior density plus the autodiff log|det J| and
TFP's TransformedDistribution; the exported model gives the Python model's numbers.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import bijectors
import tfflows
from bijectors import ordered
from tests import flow_checks
from tests import flagfiles
from tfflows import export
from tfflows import lcma
from tfflows.data import load_embedded

TINY_UNSPLIT = dict(model='realnvp', image_shape=(8, 8, 1), num_scales=3, res_blocks=1,
                    base_width=4, split='none')


def _images(n=8, shape=(8, 8, 1), seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


def _digits(n, size=8):
  """n real digits from the embedded set, downsampled from 32x32 to size x size."""
  images, _ = load_embedded('train')
  k = 32 // size
  pooled = images[:n].reshape(n, size, k, size, k, 1).astype(np.float64).mean((2, 4))
  return np.round(pooled).astype(np.uint8)


def _train(model, images, steps=1, lr=1e-2):
  """A few full-batch Adam steps, eagerly: for these tiny models, tracing the Keras train
  function costs far more than the steps themselves. ``fit`` first initialises ActNorm (Glow)
  on the images."""
  model.compile(keras.optimizers.Adam(lr), run_eagerly=True)
  model.fit(images, epochs=steps, batch_size=len(images), verbose=0)
  return model


def _log_abs_det_jacobian(flow, x):
  """log|det dz/dx| per example from the autodiff Jacobian of flow.encode, for x [B, ...].

  Every example's latents depend on that example only (batch norm runs on its moving
  averages), so the D rows of one example's Jacobian come from one backward pass over D copies
  of it: row i is the gradient of output i of copy i."""
  out = []
  d = int(np.prod(x.shape[1:]))
  for b in range(x.shape[0]):
    copies = tf.repeat(x[b:b + 1], d, axis=0)
    with tf.GradientTape() as tape:
      tape.watch(copies)
      z, _, _ = flow.encode(copies)
      flat = tf.concat([tf.reshape(t, [d, -1]) for t in z], axis=1)      # [D copies, D]
      picked = tf.reduce_sum(tf.linalg.diag_part(flat))
    jac = tf.reshape(tape.gradient(picked, copies), [d, d]).numpy().astype(np.float64)
    out.append(np.linalg.slogdet(jac)[1])
  return np.array(out)


def _synthetic_masks(path, image_shape=(8, 8, 1), num_splits=1, seed=0):
  contributions = np.random.RandomState(seed).randn(num_splits, int(np.prod(image_shape)))
  return lcma.write_masks(path, contributions, image_shape=image_shape)


# -- per-dimension log-dets -----------------------------------------------------------------
def _conditioner(out_channels):
  return keras.layers.Conv2D(out_channels, 3, padding='same',
                             bias_initializer=keras.initializers.RandomNormal(stddev=0.5))


ELEMENTWISE = {
    'to_unit': (lambda: bijectors.ToUnitInterval(), [2, 2, 2, 3], 'pixels'),
    'logit': (lambda: bijectors.Logit(0.05), [2, 2, 2, 3], 'unit'),
    'coupling_channel': (lambda: bijectors.AffineCoupling(
        _conditioner(2), 3, mask='channel', parity=1, scale_fn='tanh'), [2, 4, 4, 3], 'normal'),
    'coupling_checkerboard': (lambda: bijectors.AffineCoupling(
        _conditioner(4), 2, mask='checkerboard', parity=0, scale_fn='tanh'), [2, 4, 4, 2],
                              'normal'),
}


@pytest.mark.parametrize('case', sorted(ELEMENTWISE))
def test_elementwise_log_det_is_the_jacobian_diagonal(case, float64):
  factory, shape, kind = ELEMENTWISE[case]
  b = factory()
  x = {'pixels': lambda: tf.random.uniform(shape, 0., 256., tf.float64),
       'unit': lambda: tf.random.uniform(shape, -0.5, 0.5, tf.float64),
       'normal': lambda: tf.random.normal(shape, dtype=tf.float64)}[kind]()
  y, e = b.forward_and_elementwise_log_det(x)
  y_ref, ldj = b.forward_and_log_det(x)
  np.testing.assert_allclose(y, y_ref, atol=1e-12)
  assert e.shape == x.shape
  np.testing.assert_allclose(tf.reduce_sum(e, [1, 2, 3]), np.broadcast_to(ldj, [shape[0]]),
                             rtol=1e-10, atol=1e-9)
  for i in range(shape[0]):
    jac = flow_checks.autodiff_jacobian(b.forward, x[i:i + 1])
    np.testing.assert_allclose(np.log(np.abs(np.diag(jac))), e[i].numpy().ravel(), atol=1e-9)


def test_elementwise_walk_carries_the_map_through_permutations_and_refuses_mixing():
  b = bijectors.Chain([bijectors.Logit(0.05), bijectors.Squeeze(),
                       bijectors.ChannelPermutation([3, 1, 0, 2])])
  x = tf.random.uniform([2, 4, 4, 1], -0.5, 0.5)
  y, e = lcma.forward_and_elementwise_log_det(b, x)
  _, e_logit = bijectors.Logit(0.05).forward_and_elementwise_log_det(x)
  np.testing.assert_allclose(e, tf.gather(bijectors.squeeze(e_logit), [3, 1, 0, 2], axis=-1))
  np.testing.assert_allclose(tf.reduce_sum(e, [1, 2, 3]), b.forward_log_det_jacobian(x),
                             rtol=1e-5)
  assert y.shape == e.shape == (2, 2, 2, 4)
  with pytest.raises(ValueError, match='1x1 convolutions'):
    lcma.forward_and_elementwise_log_det(bijectors.InvertibleConv1x1(4), y)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """Phase 1 on real digits: the tiny no-split RealNVP after a few steps, and its weights."""
  keras.utils.set_random_seed(1234)
  config = tfflows.FlowConfig(**TINY_UNSPLIT)
  images = _digits(32)
  model = _train(tfflows.build_model(config), images, steps=3)
  weights = str(tmp_path_factory.mktemp('pretrain') / 'pre.weights.h5')
  model.save_weights(weights)
  return config, model, images, weights


def test_per_dimension_log_dets_sum_to_the_total_log_det_of_the_unsplit_flow(pretrained):
  _, model, images, _ = pretrained
  assert len(model.flow.levels) == 1 and model.flow.latent_shapes == [(2, 2, 16)]
  images = images[:8]
  values, _ = model.dequantizer(tf.cast(images, tf.float32), seed=tf.constant([3, 0]))
  _, _, log_det = model.flow.encode(values)
  _, e = lcma.forward_and_elementwise_log_det(model.flow.levels[0].transform, values)
  np.testing.assert_allclose(tf.reduce_sum(e, [1, 2, 3]), log_det, rtol=1e-5, atol=1e-3)
  # analyze() uses the noise seed [seed, batch index]: the same values as above.
  contributions = lcma.analyze(model, [images], seed=3, use_tf_function=False)
  assert contributions.num_examples == 8 and contributions.by_origin.shape == (2, 64)
  np.testing.assert_allclose(contributions.final.sum(), np.mean(log_det), rtol=1e-5)
  assert [m.shape for m in contributions.split_maps] == [(4, 4, 4), (2, 2, 16)]
  # by_origin is the map indexed by origin: an unsqueeze of the split-0 map (one squeeze).
  np.testing.assert_allclose(
      contributions.by_origin[0].reshape(8, 8, 1),
      ordered.unsqueeze_np(contributions.split_maps[0]))


# -- the ordered squeeze and the split permutations --------------------------------------------
def test_ordered_squeeze_is_max_and_min_pooling():
  scores = np.random.RandomState(0).randn(4, 6, 2).astype(np.float32)
  y = np.asarray(ordered.OrderedSqueeze(scores).forward(scores[None]))[0]
  assert y.shape == (2, 3, 8)
  pool = lambda t: tf.nn.max_pool2d(t[None], 2, 2, 'VALID')[0].numpy()  # noqa: E731
  np.testing.assert_array_equal(y[..., 0:4:2], pool(scores))             # 2c + 0: max
  np.testing.assert_array_equal(y[..., 4:8:2], -pool(-scores))           # 2C + 2c + 0: min
  high, low = y[..., :4].reshape(2, 3, 2, 2), y[..., 4:].reshape(2, 3, 2, 2)
  assert np.all(high[..., 0] >= high[..., 1]) and np.all(low[..., 0] <= low[..., 1])
  assert np.all(high.min(-1) >= low.max(-1))
  # The same four values per window and channel, only reordered.
  np.testing.assert_array_equal(np.sort(np.concatenate([high, low], -1), -1),
                                np.sort(ordered.squeeze_np(scores).reshape(2, 3, 2, 4), -1))


@pytest.mark.parametrize('mode', ['lcma', 'lcma_reverse', 'random', 'static'])
def test_split_permutation_is_a_permutation_at_every_level(mode, float64):
  image_shape = (8, 8, 3)
  contributions = np.random.RandomState(1).randn(3, 8 * 8 * 3)
  perms = lcma.level_permutations(contributions, image_shape, mode)
  shapes = lcma.level_shapes(image_shape, 3)
  assert shapes == [(4, 4, 12), (2, 2, 24), (1, 1, 48)]
  for perm, shape in zip(perms, shapes):
    np.testing.assert_array_equal(np.sort(perm), np.arange(np.prod(shape)))
    b = ordered.SplitPermutation(perm, shape)
    x = tf.random.normal((2,) + shape, dtype=tf.float64)
    flow_checks.assert_invertible(b, x, atol=0)
    if shape[-1] == 48:  # autodiff Jacobians at the smallest level (48 dims)
      flow_checks.assert_log_det_matches_jacobian(b, x)
  # Every image dimension is factored out exactly once (or reaches the top).
  parts = lcma.factored_origins(perms, image_shape)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(8 * 8 * 3))
  assert [p.size for p in parts] == [96, 48, 24, 24]


def test_known_pattern_lcma_keeps_the_high_half_and_reverse_its_complement():
  """Split 0: the dimensions with (h + w) even carry the high log-det, so LCMA factors out the
  (h + w) odd ones (a checkerboard) and lcma_reverse factors out exactly the others."""
  h, w = 8, 8
  rng = np.random.RandomState(2)
  hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  even = ((hh + ww) % 2 == 0).ravel()
  contributions = rng.uniform(0., 1., size=(2, h * w))
  contributions[0] += 10. * even
  perms = {m: lcma.level_permutations(contributions, (h, w, 1), m)
           for m in ('lcma', 'lcma_reverse')}
  out = {m: lcma.factored_origins(p, (h, w, 1)) for m, p in perms.items()}
  np.testing.assert_array_equal(out['lcma'][0], np.nonzero(~even)[0])
  np.testing.assert_array_equal(out['lcma_reverse'][0], np.nonzero(even)[0])
  # Split 1 works on the dimensions that went on: in every 2x2 window (of the kept tensor,
  # per channel), the two factored ones are the two lowest for lcma, the two highest for
  # lcma_reverse.
  for mode, sign in (('lcma', 1.), ('lcma_reverse', -1.)):
    kept = np.setdiff1d(np.arange(h * w), out[mode][0])
    assert np.intersect1d(out[mode][1], kept).size == out[mode][1].size == 16
    ids = ordered.squeeze_np(np.arange(h * w).reshape(h, w, 1)).ravel()[perms[mode][0]]
    ids = ordered.squeeze_np(ids.reshape(4, 4, 4)[..., :2])        # level 1's squeeze
    groups = ids.reshape(2, 2, 2, 4)                                 # [i, j, c, 2dy + dx]
    score = sign * contributions[1][groups]
    factored = np.isin(groups, out[mode][1])
    assert np.all(factored.sum(-1) == 2)
    assert np.all(np.where(factored, score, -np.inf).max(-1)
                  <= np.where(factored, np.inf, score).min(-1))


def test_random_split_is_fixed_and_recorded(tmp_path):
  path = _synthetic_masks(tmp_path / 'masks.npz')
  masks = lcma.load_masks(path)
  assert masks.metadata['random_seed'] == lcma.RANDOM_SPLIT_SEED
  expected = lcma.random_permutation(64, 0)
  np.testing.assert_array_equal(masks.permutations['random'][0], expected)
  config = tfflows.FlowConfig(model='realnvp', image_shape=(8, 8, 1), num_scales=2,
                              res_blocks=1, base_width=4, split='random')
  a = lcma.split_permutation_fn(config)(0, (4, 4, 4))
  b = lcma.split_permutation_fn(config.replace(lcma_masks=str(path)))(0, (4, 4, 4))
  np.testing.assert_array_equal(a.perm, expected)
  np.testing.assert_array_equal(b.perm, expected)


# -- the masks file ----------------------------------------------------------------------------
def test_masks_file_round_trip_and_errors(tmp_path):
  contributions = np.random.RandomState(3).randn(2, 8 * 8 * 2)
  path = lcma.write_masks(tmp_path / 'sub' / 'masks.npz', contributions, image_shape=(8, 8, 2),
                          metadata={'source': 'somewhere'})
  assert sorted(os.listdir(tmp_path / 'sub')) == ['masks.npz']  # no temporary file left
  masks = lcma.load_masks(path)
  assert masks.image_shape == (8, 8, 2) and masks.level_shapes == [(4, 4, 8), (2, 2, 16)]
  assert masks.metadata['source'] == 'somewhere'
  np.testing.assert_array_equal(masks.contributions, contributions)
  for mode in lcma.MODES:
    for got, want in zip(masks.permutations[mode],
                         lcma.level_permutations(contributions, (8, 8, 2), mode)):
      np.testing.assert_array_equal(got, want)

  with pytest.raises(FileNotFoundError, match='lcma_analyze'):
    lcma.load_masks(tmp_path / 'missing.npz')
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match='not an LCMA masks file'):
    lcma.load_masks(tmp_path / 'junk.npz')
  with np.load(path) as npz:
    arrays = dict(npz)
  arrays['perm_lcma_1'] = np.zeros_like(arrays['perm_lcma_1'])
  np.savez(tmp_path / 'broken.npz', **arrays)
  with pytest.raises(ValueError, match='not a permutation'):
    lcma.load_masks(tmp_path / 'broken.npz')
  config = tfflows.FlowConfig(model='realnvp', image_shape=(8, 8, 1), num_scales=2,
                              res_blocks=1, base_width=4, split='lcma', lcma_masks=str(path))
  with pytest.raises(ValueError, match='image_shape'):
    tfflows.build_model(config)
  small = _synthetic_masks(tmp_path / 'one_split.npz', num_splits=1)
  with pytest.raises(ValueError, match='permutations for 1 splits'):
    tfflows.build_model(config.replace(num_scales=3, lcma_masks=small))


def test_analysis_refuses_other_models():
  glow = tfflows.build_model(tfflows.FlowConfig(model='glow', image_shape=(8, 8, 1),
                                                num_levels=2, steps_per_level=1, width=4))
  with pytest.raises(ValueError, match='1x1 convolutions mix dimensions'):
    lcma.analyze(glow, [_images()])
  split = tfflows.build_model(tfflows.FlowConfig(**{**TINY_UNSPLIT, 'split': 'static'}))
  with pytest.raises(ValueError, match="split='none'"):
    lcma.analyze(split, [_images()])
  with pytest.raises(ValueError, match="split='none'"):
    tfflows.build_model(tfflows.FlowConfig(model='glow', image_shape=(8, 8, 1), split='none'))


# -- LCMA models -------------------------------------------------------------------------------
def _lcma_model(tmp_path, model='realnvp', split='lcma'):
  path = _synthetic_masks(tmp_path / 'masks.npz', num_splits=1)
  if model == 'realnvp':
    config = tfflows.FlowConfig(model='realnvp', image_shape=(8, 8, 1), num_scales=2,
                                res_blocks=1, base_width=4, split=split, lcma_masks=path)
  else:
    config = tfflows.FlowConfig(model='glow', image_shape=(8, 8, 1), num_levels=2,
                                steps_per_level=2, width=8, split=split, lcma_masks=path)
  return tfflows.build_model(config), path


@pytest.mark.parametrize('model_name', ['realnvp', 'glow'])
def test_permutation_sits_right_before_the_split(tmp_path, model_name):
  model, path = _lcma_model(tmp_path, model_name)
  level0 = model.flow.levels[0].transform.bijectors
  assert isinstance(level0[-1], ordered.SplitPermutation)
  # The level's last steps (bijectors.repeated: one loop of the channel couplings or Glow steps).
  assert level0[-2].name == ('scale0_channel' if model_name == 'realnvp' else 'level0_steps')
  perm = lcma.load_masks(path).permutations['lcma'][0]
  np.testing.assert_array_equal(level0[-1].perm, perm)
  # Same weights without the permutation: the factored latent is the permuted level output.
  static = tfflows.build_model(model.config.replace(split='static', lcma_masks=''))
  static.set_weights(model.get_weights())
  values = tf.cast(_images(2), tf.float32) + 0.5
  h = static.flow.levels[0].transform.forward(values)
  z1 = model.flow.encode(values)[0][-1]
  expected = tf.reshape(tf.gather(tf.reshape(h, [2, -1]), perm, axis=1), h.shape)[..., 2:]
  np.testing.assert_allclose(z1, expected, rtol=1e-6)


@pytest.mark.parametrize('model_name', ['realnvp', 'glow'])
def test_lcma_log_prob_is_exact(tmp_path, model_name):
  """log_prob = prior density of the latents + log|det J| (autodiff), and equals TFP's
  TransformedDistribution over the joint prior; decode inverts encode."""
  model, _ = _lcma_model(tmp_path, model_name, split='lcma_reverse')
  images = _images(2)
  _train(model, images)
  values = tf.cast(images, tf.float32) + 0.5
  fast = model.log_weight(tf.cast(images, tf.float32), midpoint=True)
  np.testing.assert_allclose(fast, model.distribution.log_prob(values), rtol=1e-5, atol=1e-3)
  latents, contexts, log_det = model.flow.encode(values)
  np.testing.assert_allclose(log_det, _log_abs_det_jacobian(model.flow, values), rtol=1e-4,
                             atol=2e-2)
  prior = sum(p.distribution(r).log_prob(z) for p, z, r in zip(model.priors, latents, contexts))
  np.testing.assert_allclose(fast, prior + log_det, rtol=1e-6, atol=1e-3)
  np.testing.assert_array_equal(model.decode(model.encode(images)).numpy(), images)


# -- the two-phase workflow ----------------------------------------------------------------------
def test_two_phase_workflow_end_to_end(tmp_path, pretrained):
  # Phase 1 (the fixture): pre-trained with no factoring out, weights saved.
  pre_config, _, images, weights = pretrained
  # Phase 2: analyse (a fresh model restored from the weights) and write the masks file.
  masks_path = str(tmp_path / 'workdir' / lcma.MASKS_NAME)
  batches = tf.data.Dataset.from_tensor_slices(images).batch(16)
  path, contributions = lcma.run_lcma_analyze(pre_config, weights, batches, masks_path,
                                              source=str(tmp_path), use_tf_function=False)
  assert path == masks_path and contributions.num_examples == 32
  masks = lcma.load_masks(path)
  assert masks.metadata['pretrain_config']['split'] == 'none'
  assert 'kept' in lcma.describe(contributions)
  # Phase 3: the LCMA model from the file; its config records the file.
  config = lcma.lcma_config(pre_config, path)
  model = _train(tfflows.build_model(config), images, steps=3)
  assert model.config.split == 'lcma' and model.config.lcma_masks == path
  for level in (0, 1):
    np.testing.assert_array_equal(model.flow.levels[level].transform.bijectors[-1].perm,
                                  masks.permutations['lcma'][level])
  log_prob = model.log_prob(images[:4], seed=0).numpy()
  assert np.all(np.isfinite(log_prob))
  # A model rebuilt from the recorded config (as a restore does) is the same model.
  again = tfflows.build_model(tfflows.FlowConfig.from_json(model.config.to_json()))
  again.set_weights(model.get_weights())
  x = tf.cast(images[:4], tf.float32)
  np.testing.assert_array_equal(again.log_weight(x, midpoint=True),
                                model.log_weight(x, midpoint=True))
  # Export: the served numbers are the Python model's.
  export_dir = export.export_saved_model(model, tmp_path / 'export' / '1')
  loaded, exported_config = export.load_exported(export_dir)
  assert exported_config.split == 'lcma' and exported_config.lcma_masks == path
  served = export.serve_log_prob(loaded, images[:4])
  np.testing.assert_array_equal(served['log_prob'], log_prob)
  # Next to the export, the masks file travels with the config.
  bundled = lcma.bundle_masks(exported_config, tmp_path / 'export' / 'assets_extra')
  assert os.path.isfile(bundled.lcma_masks)
  np.testing.assert_array_equal(lcma.load_masks(bundled.lcma_masks).permutations['lcma'][0],
                                masks.permutations['lcma'][0])


# -- the flagfiles -------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['celeba64', 'cifar10', 'imagenet32', 'imagenet64', 'mnist'])
def test_flagfiles_describe_valid_lcma_models(name):
  """Each configs/lcma_*.flags, read by train.main's flags, holds the paper's settings and a
  valid LCMA config whose phase-1 variant (--split=none) is valid too."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  values, config = flagfiles.parse(os.path.join(root, 'configs', f'lcma_{name}.flags'))
  assert config.model == 'realnvp' and config.split == 'lcma'
  assert values['optimizer'] == 'adam' and values['learning_rate'] == 1e-3
  assert values['scale_l2'] == 5e-5 and values['max_grad_norm'] == 100
  assert config.logit_alpha == 0.05 and values['batch_size'] == 64
  config.replace(split='none')
  shapes = lcma.level_shapes(config.image_shape, config.num_scales - 1)
  # The last scale runs at 4x4 (RealNVP's recursion ends there); CIFAR-10 scales once.
  assert shapes[-1][0] == {'celeba64': 4, 'imagenet64': 4, 'imagenet32': 4, 'cifar10': 16,
                           'mnist': 8}[name]
