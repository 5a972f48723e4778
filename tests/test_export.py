"""SavedModel export: the served numbers equal the model's, bit for bit, and bad input is refused."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfflows
from tests import flow_checks
from tfflows import export

# 3 steps a level: the steps run as a tf.while_loop (bijectors.repeated) in the exported graphs.
TINY_GLOW = dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=3, width=8)


def _images(n, seed=0):
  return np.random.RandomState(seed).randint(0, 256, size=(n, 8, 8, 1)).astype(np.uint8)


def _trained_glow():
  return flow_checks.one_step_model(TINY_GLOW, random_seed=7)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  model = _trained_glow()
  export_dir = export.export_saved_model(model, tmp_path_factory.mktemp('export') / '1')
  loaded, config = export.load_exported(export_dir)
  return model, export_dir, loaded, config


def _saved_model_cli():
  """saved_model_cli ships with tensorflow, next to the interpreter of this venv."""
  path = os.path.join(os.path.dirname(sys.executable), 'saved_model_cli')
  path = path if os.path.exists(path) else shutil.which('saved_model_cli')
  if not path:
    pytest.skip('saved_model_cli not found next to the Python interpreter or on PATH')
  return path


def _run_cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run([_saved_model_cli(), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@pytest.mark.parametrize('batch', [1, 5])
def test_serving_default_equals_log_prob_exactly(exported, batch):
  model, _, loaded, _ = exported
  images = _images(batch, seed=batch)
  served = loaded.signatures['serving_default'](images=tf.constant(images))
  assert set(served) == {'log_prob', 'bits_per_dim'}
  assert served['log_prob'].shape == (batch,) and served['log_prob'].dtype == tf.float32
  np.testing.assert_array_equal(served['log_prob'].numpy(), model.log_prob(images, seed=0).numpy())
  np.testing.assert_array_equal(served['bits_per_dim'].numpy(),
                                model.bits_per_dim(images, seed=0).numpy())
  np.testing.assert_allclose(served['bits_per_dim'].numpy(),
                             -served['log_prob'].numpy() / (64 * math.log(2.)), rtol=1e-6)
  # Deterministic: the same numbers again, and the tf.function attribute agrees.
  np.testing.assert_array_equal(loaded.log_prob(tf.constant(images))['log_prob'],
                                served['log_prob'])


def test_sample_signature_equals_model_sample(exported):
  model, _, loaded, _ = exported
  served = loaded.signatures['sample'](num_samples=tf.constant(3), temperature=tf.constant(0.7),
                                       seed=tf.constant(11))['images'].numpy()
  assert served.shape == (3, 8, 8, 1) and served.dtype == np.uint8
  np.testing.assert_array_equal(served, model.sample(3, temperature=0.7, seed=11).numpy())
  other = loaded.sample(tf.constant(3), tf.constant(0.7), tf.constant(12))['images'].numpy()
  assert not np.array_equal(served, other)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((2, 8, 8, 1), np.float32), 'expected to be a uint8 tensor'),
    (np.zeros((2, 4, 8, 1), np.uint8), r'not compatible with expected shape \[\?,8,8,1\]'),
    (np.zeros((2, 8, 8, 3), np.uint8), r'not compatible with expected shape \[\?,8,8,1\]'),
    (np.zeros((8, 8, 1), np.uint8), r'not compatible with expected shape \[\?,8,8,1\]'),
])
def test_signature_refuses_wrong_dtype_or_shape(exported, bad, message):
  _, _, loaded, _ = exported
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    loaded.signatures['serving_default'](images=tf.constant(bad))
  with pytest.raises(ValueError, match="Input 'images' must have"):
    export.serve_log_prob(loaded, bad)


def test_sample_signature_refuses_bad_arguments(exported):
  _, _, loaded, _ = exported
  with pytest.raises(tf.errors.InvalidArgumentError, match='num_samples must be >= 1'):
    loaded.signatures['sample'](num_samples=tf.constant(0), temperature=tf.constant(1.),
                                seed=tf.constant(0))
  with pytest.raises(tf.errors.InvalidArgumentError, match='temperature must be >= 0'):
    loaded.signatures['sample'](num_samples=tf.constant(1), temperature=tf.constant(-1.),
                                seed=tf.constant(0))


def test_serve_log_prob_helper(exported):
  model, _, loaded, _ = exported
  images = _images(3)
  served = export.serve_log_prob(loaded, images)
  np.testing.assert_array_equal(served['log_prob'], model.log_prob(images, seed=0).numpy())


def test_config_json_round_trips(exported):
  model, export_dir, _, config = exported
  assert config == model.config
  path = os.path.join(export_dir, 'assets', export.CONFIG_NAME)
  with open(path, encoding='utf-8') as f:
    assert tfflows.FlowConfig.from_dict(json.load(f)) == model.config


def test_saved_model_cli_show_and_run(exported, tmp_path):
  """`saved_model_cli run` loads through the TF1 session loader, as TF Serving does."""
  model, export_dir, _, _ = exported
  shown = _run_cli('show', '--dir', str(export_dir), '--all')
  for expected in ("signature_def['serving_default']", "signature_def['sample']",
                   "inputs['images']", "outputs['log_prob']", "outputs['bits_per_dim']",
                   "inputs['num_samples']", "inputs['temperature']", "inputs['seed']",
                   "outputs['images']", 'DT_UINT8'):
    assert expected in shown, expected
  images = _images(4, seed=3)
  np.save(tmp_path / 'images.npy', images)
  _run_cli('run', '--dir', str(export_dir), '--tag_set', 'serve', '--signature_def',
           'serving_default', '--inputs', f'images={tmp_path / "images.npy"}',
           '--outdir', str(tmp_path / 'out'))
  np.testing.assert_array_equal(np.load(tmp_path / 'out' / 'log_prob.npy'),
                                model.log_prob(images, seed=0).numpy())


def test_importance_weighted_export(exported, tmp_path):
  model = exported[0]
  export_dir = export.export_saved_model(model, tmp_path / '1', num_importance_samples=3)
  loaded, _ = export.load_exported(export_dir)
  images = _images(2)
  np.testing.assert_array_equal(
      loaded.signatures['serving_default'](images=tf.constant(images))['log_prob'].numpy(),
      model.log_prob(images, num_samples=3, seed=0).numpy())


def test_untrained_model_is_refused(tmp_path):
  model = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  with pytest.raises(ValueError, match='ActNorm layers are not initialised'):
    export.export_saved_model(model, tmp_path / '1')
  assert not os.listdir(tmp_path)


def test_export_is_atomic(exported, tmp_path, monkeypatch):
  model = exported[0]
  target = tmp_path / 'export' / '1'

  def crash(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(tf.saved_model, 'save', crash)
  with pytest.raises(RuntimeError, match='disk full'):
    export.export_saved_model(model, target)
  assert os.listdir(tmp_path / 'export') == []  # neither the target nor a temporary directory
  monkeypatch.undo()

  export.export_saved_model(model, target)
  assert os.listdir(tmp_path / 'export') == ['1']
  with pytest.raises(FileExistsError, match='overwrite=True'):
    export.export_saved_model(model, target)
  export.export_saved_model(model, target, overwrite=True)
  assert os.listdir(tmp_path / 'export') == ['1']
  assert export.next_version_dir(tmp_path / 'export') == str(tmp_path / 'export' / '2')


def test_load_exported_names_a_missing_model(tmp_path):
  with pytest.raises(FileNotFoundError, match='No SavedModel'):
    export.load_exported(tmp_path)


def test_served_number_of_an_image_does_not_depend_on_its_batch(exported):
  """The noise of each image comes from its own pixels and the serving seed: alone, in a batch
  of 8 or 64, or reversed, an image gets the same number (TF Serving's request batching cannot
  change a client's answer). Tolerance: see tests/test_random.py RTOL (oneDNN's kernels for a
  batch of one image can differ by a float32 ulp)."""
  _, _, loaded, _ = exported
  serve = loaded.signatures['serving_default']
  images = _images(64, seed=11)
  eight = serve(images=tf.constant(images[:8]))['log_prob'].numpy()
  np.testing.assert_allclose(serve(images=tf.constant(images))['log_prob'].numpy()[:8], eight,
                             rtol=1e-6, atol=0)
  np.testing.assert_allclose(serve(images=tf.constant(images[:8][::-1]))['log_prob'].numpy()[::-1],
                             eight, rtol=1e-6, atol=0)
  for i in range(3):
    np.testing.assert_allclose(serve(images=tf.constant(images[i:i + 1]))['log_prob'].numpy(),
                               eight[i:i + 1], rtol=1e-6, atol=0)


def test_sample_signature_refuses_a_temperature_that_is_not_finite(exported):
  _, _, loaded, _ = exported
  for t in (np.inf, np.nan):
    with pytest.raises(tf.errors.InvalidArgumentError, match='temperature must be'):
      loaded.signatures['sample'](num_samples=tf.constant(2), temperature=tf.constant(t, tf.float32),
                                  seed=tf.constant(0))


def test_a_model_that_gives_nan_is_not_exported_and_not_served_silently(exported, tmp_path):
  """Issue 10 item 4: a model with finite weights whose outputs are NaN. export refuses it
  when given check images; exported anyway, both signatures fail the call instead of serving
  NaN numbers or turning NaN into pixels. (The signatures are called as the module's
  tf.functions, the graphs a SavedModel stores, to spare a second export.)"""
  from tfflows.models.flow_model import NonFiniteError  # pylint: disable=import-outside-toplevel
  model = exported[0]
  net = flow_checks.first_level_networks(model)
  saved = [w.numpy() for w in net]
  try:
    for w in net:
      w.assign(tf.fill(w.shape, tf.constant(1e30, w.dtype)))
    with pytest.raises(NonFiniteError, match='not exported'):
      export.export_saved_model(model, tmp_path / 'export' / '1', check_images=_images(4))
    assert not os.path.exists(tmp_path / 'export')
    config_path = tmp_path / 'config.json'
    config_path.write_text(model.config.to_json())
    module = export.FlowServingModule(model, str(config_path))
    with pytest.raises(tf.errors.InvalidArgumentError, match='log_prob: the model produced NaN'):
      module.log_prob(tf.constant(_images(2)))
    with pytest.raises(tf.errors.InvalidArgumentError, match='sample: the model produced NaN'):
      module.sample(tf.constant(2), tf.constant(1.), tf.constant(0))
  finally:
    for w, value in zip(net, saved):
      w.assign(value)


def test_bfloat16_served_sample_equals_model_sample(tmp_path):
  """With bfloat16 networks (which round differently eagerly and in a graph) the served
  ``sample`` equals ``model.sample`` bit for bit: both run the same traced body."""
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(3)
  model = tfflows.build_model(tfflows.FlowConfig(
      model='denseflow', image_shape=(8, 8, 3), block_conf=(2, 1), layers_conf=(1, 1),
      layer_mid_channels=(8, 8), growth_rate=2, dense_layers=1, dense_growth=4,
      split_prior='learned', dequantization='uniform', conditioner_precision='bfloat16'))
  model.initialize(np.random.RandomState(0).randint(0, 256, (4, 8, 8, 3)).astype(np.uint8))
  rng = np.random.default_rng(0)
  for w in model.trainable_weights:   # every network away from its zero initialisation
    w.assign(w.numpy() + 0.05 * rng.standard_normal(w.shape))
  loaded, _ = export.load_exported(export.export_saved_model(model, tmp_path / '1'))
  for seed, temperature in [(11, 0.7), (5, 1.0)]:
    served = loaded.signatures['sample'](num_samples=tf.constant(4),
                                         temperature=tf.constant(temperature),
                                         seed=tf.constant(seed))['images'].numpy()
    np.testing.assert_array_equal(served, model.sample(4, temperature, seed=seed).numpy())
