"""Out-of-distribution scores (tfflows.ood): the arithmetic against hand computations, the served
numbers against Python's, TF Serving's warm-up file, the OOD sets and ``--mode=ood``."""

import importlib.util
import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf

import tfflows
from tests import flow_checks
from tfflows import export
from tfflows import ood
from tfflows import serving_warmup
from tfflows.data import load_embedded
from tfflows.data import ood_sets
from tfflows.models.flow_model import NonFiniteError

TINY_GLOW = dict(model='glow', image_shape=(8, 8, 1), num_levels=2, steps_per_level=2, width=8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, seed=0, shape=(8, 8, 1)):
  return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


@pytest.fixture(scope='module')
def model():
  return flow_checks.one_step_model(TINY_GLOW, random_seed=3)


def _png_chunks(data):
  """[(type, payload)] of a PNG file, checking signature, lengths and CRCs by hand."""
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  chunks, at = [], 8
  while at < len(data):
    (length,) = struct.unpack('>I', data[at:at + 4])
    kind, payload = data[at + 4:at + 8], data[at + 8:at + 8 + length]
    (crc,) = struct.unpack('>I', data[at + 8 + length:at + 12 + length])
    assert crc == zlib.crc32(kind + payload)
    chunks.append((kind.decode(), payload))
    at += 12 + length
  assert at == len(data)
  return chunks


# ------------------------------------------------------------------------------ complexity
def test_complexity_is_the_png_file_length_in_bits_per_dim():
  """L(x) = 8 * len(PNG(x)) / D, the whole file: signature, IHDR, IDAT, IEND (57 bytes of
  overhead around one IDAT's zlib stream), and the PNG is x, losslessly."""
  digits = load_embedded('test')[0][:3]
  images = np.concatenate([digits, np.full((1, 32, 32, 1), 77, np.uint8),
                           _images(1, seed=5, shape=(32, 32, 1))])
  complexity = ood.complexity_bits_per_dim(images).numpy()
  assert complexity.dtype == np.float32 and complexity.shape == (5,)
  for image, value in zip(images, complexity):
    png = tf.io.encode_png(image, compression=ood.PNG_COMPRESSION).numpy()
    chunks = _png_chunks(png)
    assert [kind for kind, _ in chunks] == ['IHDR', 'IDAT', 'IEND']
    width, height, depth, colour = struct.unpack('>IIBB', chunks[0][1][:10])
    assert (width, height, depth, colour) == (32, 32, 8, 0)  # 8-bit grey
    idat = chunks[1][1]
    assert len(png) - len(idat) == 57
    # The IDAT stream is zlib: 32 rows of one filter byte and 32 grey bytes.
    assert len(zlib.decompress(idat)) == 32 * (1 + 32)
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), image)
    assert value == 8 * len(png) / (32 * 32)  # exact in float32
  constant, noise = complexity[3], complexity[4]
  assert constant < complexity[:3].min() and noise > complexity[:3].max() > 1.
  assert noise > 8.  # incompressible: 8 bits a pixel, plus filter bytes and overhead


def test_complexity_of_colour_images_counts_every_channel():
  images = _images(2, seed=2, shape=(4, 6, 3))
  complexity = ood.complexity_bits_per_dim(images).numpy()
  for image, value in zip(images, complexity):
    png = tf.io.encode_png(image, compression=9).numpy()
    assert value == pytest.approx(8 * len(png) / (4 * 6 * 3), rel=1e-7)


@pytest.mark.parametrize('bad, message', [
    (np.zeros((2, 8, 8, 1), np.float32), 'Expected uint8 images'),
    (np.zeros((8, 8, 1), np.uint8), r'shape \[batch, H, W, C\]'),
    (np.zeros((2, 8, 8, 5), np.uint8), 'PNG holds 1 to 4 channels'),
])
def test_complexity_refuses_bad_images(bad, message):
  with pytest.raises(ValueError, match=message):
    ood.complexity_bits_per_dim(bad)


# ---------------------------------------------------------------------------------- scores
def test_score_is_model_bits_minus_png_bits_by_hand(model):
  images = np.concatenate([_images(3, seed=4), np.zeros((1, 8, 8, 1), np.uint8)])
  result = ood.scores(model, images)
  log_prob = model.log_prob(images, seed=0).numpy().astype(np.float64)
  model_bits = -log_prob / (8 * 8 * math.log(2.))
  png_bits = np.array([8. * len(tf.io.encode_png(x, compression=9).numpy()) / 64.
                       for x in images])
  np.testing.assert_allclose(result['bits_per_dim'], model_bits, rtol=1e-6)
  np.testing.assert_array_equal(result['complexity_bits_per_dim'], png_bits)
  np.testing.assert_allclose(result['score'], model_bits - png_bits, rtol=1e-6, atol=1e-6)
  assert set(result) == {'bits_per_dim', 'complexity_bits_per_dim', 'score'}
  # The zero image compresses far better than noise: its score is raised by far more.
  correction = result['bits_per_dim'] - result['score']
  assert correction[3] < correction[:3].min()
  # batched_scores gives the same numbers in any batch size (per-image noise seeds).
  batched = ood.batched_scores(model, images, batch_size=3)
  for key in result:
    np.testing.assert_array_equal(batched[key], result[key])


def test_scores_refuse_a_model_that_gives_nan(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(3)
  broken = tfflows.build_model(tfflows.FlowConfig(**TINY_GLOW))
  broken.compile(keras.optimizers.SGD(1e-2))
  broken.fit(_images(8, seed=1), epochs=1, batch_size=8, verbose=0)
  for w in flow_checks.first_level_networks(broken):
    w.assign(tf.fill(w.shape, tf.constant(1e30, w.dtype)))
  with pytest.raises(NonFiniteError, match='bits_per_dim: the model gives NaN or Inf'):
    ood.scores(broken, _images(2))
  # Served: the ood signature fails the call (its graph, as the module's tf.function).
  config_path = tmp_path / 'config.json'
  config_path.write_text(broken.config.to_json())
  module = export.FlowServingModule(broken, str(config_path))
  with pytest.raises(tf.errors.InvalidArgumentError, match='model produced NaN or Inf values'):
    module.ood(tf.constant(_images(2)))
  # Without check images, the export checks its warm-up images and refuses the model.
  with pytest.raises(NonFiniteError, match='not exported'):
    export.export_saved_model(broken, tmp_path / 'export' / '1')
  assert not os.path.exists(tmp_path / 'export')


# ------------------------------------------------------------------------------ typicality
def test_typicality_statistics_by_hand():
  train = np.array([1., 2., 3., 6.])  # H_hat = 3
  # Batches of all 4 held-out values: every draw has mean 3.75, distance 0.75.
  stats = ood.typicality_statistics(train, [3., 4., 4., 4.], batch_size=4, alpha=0.9,
                                    num_bootstrap=20)
  assert stats.train_bits_per_dim == 3. and stats.epsilon == pytest.approx(0.75)
  assert (stats.batch_size, stats.num_train_images, stats.num_heldout_images) == (4, 4, 4)
  # One-image batches from values at distance 0.5 and 1.5: the 0.99-quantile is 1.5 unless
  # fewer than 1% of 500 draws hit 4.5, and the 0.01-quantile 0.5.
  high = ood.typicality_statistics(train, [2.5, 4.5], batch_size=1, alpha=0.99, num_bootstrap=500)
  low = ood.typicality_statistics(train, [2.5, 4.5], batch_size=1, alpha=0.01, num_bootstrap=500)
  assert high.epsilon == pytest.approx(1.5) and low.epsilon == pytest.approx(0.5)
  # The test: |mean - H_hat| against epsilon = 0.75.
  assert ood.typicality_test(stats, [3., 3., 3., 3.7]) == (pytest.approx(0.175), False)
  assert ood.typicality_test(stats, [1., 1., 1., 1.]) == (pytest.approx(2.), True)
  assert ood.typicality_test(stats, [4., 4., 4., 4.])[1] is True  # too unlikely
  assert ood.typicality_test(stats, [2., 2., 2., 2.])[1] is True  # too likely: not typical


def test_typicality_refuses_wrong_batches_and_non_finite_values():
  stats = ood.typicality_statistics([3.] * 10, [3.1] * 10, batch_size=4)
  with pytest.raises(ValueError, match='batches of exactly M = 4 images.*got 3'):
    ood.typicality_test(stats, [3., 3., 3.])
  with pytest.raises(NonFiniteError, match='NaN or Inf for 1 of 4'):
    ood.typicality_test(stats, [3., np.nan, 3., 3.])
  with pytest.raises(NonFiniteError, match='held-out bits_per_dim'):
    ood.typicality_statistics([3.] * 10, [np.inf] * 10, batch_size=4)
  with pytest.raises(ValueError, match='at least 8 held-out images, got 5'):
    ood.typicality_statistics([3.] * 10, [3.] * 5, batch_size=8)


def test_typicality_statistics_json_round_trip_and_refusals():
  stats = ood.typicality_statistics(np.linspace(1, 2, 50), np.linspace(1, 2.2, 30), 5, seed=3,
                                    num_importance_samples=4)
  text = stats.to_json()
  assert json.loads(text)['units'] == 'bits/dim'
  assert ood.TypicalityStatistics.from_json(text) == stats
  values = json.loads(text)
  with pytest.raises(ValueError, match='unknown fields'):
    ood.TypicalityStatistics.from_json(json.dumps({**values, 'threshold': 1.}))
  with pytest.raises(ValueError, match='epsilon must be a finite number'):
    ood.TypicalityStatistics.from_json(json.dumps({**values, 'epsilon': float('nan')}))
  with pytest.raises(ValueError, match='batch_size must be an integer >= 1'):
    ood.TypicalityStatistics.from_json(json.dumps({**values, 'batch_size': 0}))


# ---------------------------------------------------------------------------------- AUROC
def test_auroc_is_the_pairwise_probability():
  assert ood.auroc([1., 2.], [3., 4.]) == 1.
  assert ood.auroc([3., 4.], [1., 2.]) == 0.
  assert ood.auroc([1., 1.], [1., 1.]) == 0.5
  rng = np.random.default_rng(0)
  inside, outside = rng.integers(0, 6, 40).astype(float), rng.integers(2, 9, 30).astype(float)
  pairs = (outside[:, None] > inside[None]).mean() + 0.5 * (outside[:, None] == inside[None]).mean()
  assert ood.auroc(inside, outside) == pytest.approx(pairs)
  with pytest.raises(ValueError, match='NaN or Inf'):
    ood.auroc([1., np.nan], [2.])


# ---------------------------------------------------------------------------------- export
@pytest.fixture(scope='module')
def exported(model, tmp_path_factory):
  stats = ood.typicality_statistics(np.linspace(7., 9., 40), np.linspace(7.5, 8.5, 20),
                                    batch_size=3, seed=1)
  check = _images(8, seed=9)
  export_dir = export.export_saved_model(model, tmp_path_factory.mktemp('ood') / '1',
                                         check_images=check, typicality=stats)
  loaded, _ = export.load_exported(export_dir)
  return export_dir, loaded, stats, check


def test_ood_signature_serves_the_python_numbers(model, exported):
  _, loaded, _, _ = exported
  images = np.concatenate([_images(4, seed=11), np.full((1, 8, 8, 1), 200, np.uint8)])
  served = loaded.signatures['ood'](images=tf.constant(images))
  python = ood.scores(model, images)
  assert set(served) == {'bits_per_dim', 'complexity_bits_per_dim', 'score'}
  for key, value in python.items():
    assert served[key].dtype == tf.float32 and served[key].shape == (5,)
    np.testing.assert_array_equal(served[key].numpy(), value, err_msg=key)
  np.testing.assert_array_equal(
      served['bits_per_dim'].numpy(),
      loaded.signatures['serving_default'](images=tf.constant(images))['bits_per_dim'].numpy())
  empty = loaded.signatures['ood'](images=tf.zeros([0, 8, 8, 1], tf.uint8))
  assert all(v.shape == (0,) for v in empty.values())
  with pytest.raises(tf.errors.InvalidArgumentError, match='expected to be a uint8 tensor'):
    loaded.signatures['ood'](images=tf.zeros([1, 8, 8, 1], tf.float32))
  with pytest.raises(tf.errors.InvalidArgumentError, match='not compatible with expected shape'):
    loaded.signatures['ood'](images=tf.zeros([1, 8, 4, 1], tf.uint8))


def test_existing_signatures_keep_their_inputs_and_outputs(exported):
  _, loaded, _, _ = exported
  assert set(loaded.signatures) == {'serving_default', 'sample', 'ood', 'typicality'}
  inputs = {name: sorted(fn.structured_input_signature[1])
            for name, fn in loaded.signatures.items()}
  outputs = {name: sorted(fn.structured_outputs) for name, fn in loaded.signatures.items()}
  assert inputs['serving_default'] == ['images'] and inputs['ood'] == ['images']
  assert inputs['sample'] == ['num_samples', 'seed', 'temperature']
  assert outputs['serving_default'] == ['bits_per_dim', 'log_prob']
  assert outputs['sample'] == ['images']


def test_typicality_asset_and_signature(model, exported):
  export_dir, loaded, stats, _ = exported
  assert export.load_typicality(export_dir) == stats
  assert loaded.typicality_file.asset_path.numpy().decode().endswith('typicality.json')
  images = _images(3, seed=12)
  served = loaded.signatures['typicality'](images=tf.constant(images))
  bits = model.bits_per_dim(images, seed=0).numpy()
  distance, is_ood = ood.typicality_test(stats, bits)
  assert served['distance'].numpy() == pytest.approx(distance, abs=1e-12)
  assert served['epsilon'].numpy() == stats.epsilon
  assert bool(served['is_out_of_distribution'].numpy()) == is_ood
  with pytest.raises(tf.errors.InvalidArgumentError, match='exactly M = 3 images'):
    loaded.signatures['typicality'](images=tf.constant(_images(4)))
  # Without statistics there is no typicality signature and no asset.
  plain = export.export_saved_model(model, os.path.join(os.path.dirname(export_dir), '2'),
                                    warmup=False)
  assert export.load_typicality(plain) is None
  assert set(export.load_exported(plain)[0].signatures) == {'serving_default', 'sample', 'ood'}
  assert not os.path.exists(os.path.join(plain, serving_warmup.WARMUP_PATH))


def test_warmup_file_is_prediction_log_records_tf_serving_replays(exported):
  """The file parses as TFRecords of tensorflow.serving.PredictionLog (the protos of
  tensorflow-serving-api), and every request runs on the loaded model as TF Serving runs it."""
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=import-outside-toplevel
  export_dir, loaded, stats, check = exported
  path = os.path.join(export_dir, 'assets.extra', 'tf_serving_warmup_requests')
  records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
  logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
  assert all(log.WhichOneof('log_type') == 'predict_log' for log in logs)
  names = [log.predict_log.request.model_spec.signature_name for log in logs]
  assert sorted(set(names)) == sorted(loaded.signatures)
  assert all(names.count(name) >= 1 for name in loaded.signatures)
  requests = serving_warmup.read_warmup_requests(path)
  assert [name for name, _ in requests] == names
  for name, inputs in requests:
    signature = loaded.signatures[name]
    spec = signature.structured_input_signature[1]
    assert sorted(inputs) == sorted(spec)
    for key, value in inputs.items():
      assert value.dtype == spec[key].dtype.as_numpy_dtype
      assert spec[key].shape.is_compatible_with(value.shape)
    result = signature(**{k: tf.constant(v) for k, v in inputs.items()})
    assert all(np.isfinite(v.numpy()).all() for v in result.values()
               if v.dtype.is_floating)
  images = [inputs['images'] for name, inputs in requests if name == 'serving_default']
  np.testing.assert_array_equal(images[-1], check)
  assert [inputs['images'].shape[0] for name, inputs in requests
          if name == 'typicality'] == [stats.batch_size]


def test_saved_model_cli_runs_the_ood_signature(model, exported, tmp_path):
  """The TF1 session loader (TF Serving's) runs the PNG encoding in the graph."""
  from tests.test_export import _run_cli  # pylint: disable=import-outside-toplevel
  export_dir, _, _, _ = exported
  images = _images(3, seed=13)
  np.save(tmp_path / 'images.npy', images)
  _run_cli('run', '--dir', str(export_dir), '--tag_set', 'serve', '--signature_def', 'ood',
           '--inputs', f'images={tmp_path / "images.npy"}', '--outdir', str(tmp_path / 'out'))
  python = ood.scores(model, images)
  for key in python:
    np.testing.assert_array_equal(np.load(tmp_path / 'out' / f'{key}.npy'), python[key])


def test_export_refuses_statistics_of_another_k(model, tmp_path):
  stats = ood.typicality_statistics([1.] * 4, [1.] * 4, batch_size=2)
  with pytest.raises(ValueError, match='k = 1, the export serves k = 2'):
    export.export_saved_model(model, tmp_path / '1', num_importance_samples=2, typicality=stats)
  assert not os.path.exists(tmp_path / '1')


# ------------------------------------------------------------------------------- data sets
def test_ood_sets_are_real_images_in_the_test_images_shape():
  test = load_embedded('test')[0][:20]
  sets = ood_sets.ood_sets(test, seed=0)
  assert list(sets) == list(ood_sets.NAMES)
  for name, images in sets.items():
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 1), name
  assert len(sets['sklearn_digits']) == len(sets['photo_patches']) == 500
  np.testing.assert_array_equal(sets['inverted'], 255 - test)
  np.testing.assert_array_equal(sets['flipped'], test[:, :, ::-1])
  assert all((image == image.flat[0]).all() for image in sets['constant'])
  assert len(np.unique(sets['constant'][:, 0, 0, 0])) > 10
  assert sets['noise'].std() > 70  # uniform on 0..255: std 73.9
  # Real pictures: digits in the MNIST frame (empty border), photo patches of varied content.
  digits = sets['sklearn_digits'].astype(float)
  assert digits[:, :6].max() == 0 and digits[:, 6:26, 6:26].mean() > 20
  assert len(np.unique(sets['photo_patches'].reshape(500, -1).std(axis=1).round())) > 50
  resized = ood_sets.stored_sets((16, 16, 3))
  assert resized['photo_patches'].shape == (500, 16, 16, 3)


# Optional (scikit-learn and scikit-image are not test dependencies): with both installed,
# the shipped sets are rebuilt from their sources and must come out identical.
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ('sklearn', 'skimage')),
                    reason='needs scikit-learn and scikit-image')
def test_make_ood_sets_reproduces_the_shipped_file(tmp_path):
  from tfflows.data import make_ood_sets  # pylint: disable=import-outside-toplevel
  out = make_ood_sets.build(str(tmp_path / 'ood_sets.npz'))
  shipped = ood_sets.stored_sets()
  with np.load(out) as new:
    for name in ood_sets.STORED:
      np.testing.assert_array_equal(new[name], shipped[name], err_msg=name)


# ---------------------------------------------------------------------------- --mode=ood
def test_mode_ood_writes_aurocs_and_export_carries_the_same_statistics(tmp_path):
  from tests.test_train import _main  # pylint: disable=import-outside-toplevel
  from train import modes  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / 'run')
  _main(f'--workdir={workdir}', '--epochs=1', '--mode=train,ood,export', '--nojit_compile',
        '--eval_batch_size=250', '--typicality_train_images=500', '--typicality_bootstrap=200')
  path = modes.result_path(workdir, 'ood', 4, k=1)
  with open(path, encoding='utf-8') as f:
    result = json.load(f)
  assert set(result['sets']) == set(ood_sets.NAMES)
  assert result['in_distribution']['num_images'] == 500
  stats = ood.TypicalityStatistics.from_json(json.dumps(result['typicality']))
  assert (stats.num_train_images, stats.num_heldout_images, stats.batch_size) == (500, 250, 10)
  for name, values in result['sets'].items():
    for key in ('auroc_bits_per_dim', 'auroc_score', 'auroc_complexity', 'typicality_auroc',
                'typicality_detection_rate'):
      assert 0. <= values[key] <= 1., (name, key)
    assert values['mean_score'] == pytest.approx(
        values['mean_bits_per_dim'] - values['mean_complexity_bits_per_dim'], abs=1e-5)
  # Noise is the most complex input there is: the complexity alone flags it perfectly.
  assert result['sets']['noise']['auroc_complexity'] == 1.
  assert export.load_typicality(os.path.join(workdir, 'export', '4')) == stats
