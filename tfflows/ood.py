r"""Out-of-distribution scores from a flow's likelihood: a complexity-corrected score per image
and a typicality test per batch.

    from tfflows import ood
    s = ood.scores(model, images)          # {'bits_per_dim', 'complexity_bits_per_dim', 'score'}
    stats = ood.fit_typicality(model, train_images, heldout_images, batch_size=10)
    distance, is_ood = ood.typicality_test(stats, s['bits_per_dim'][:10])
    ood.auroc(in_distribution_scores, out_of_distribution_scores)

Why: a flow's likelihood is a poor answer to "is this input like the training data?": flows
trained on one image set give higher likelihood to simpler images of another (Nalisnick,
Matsukawa, Teh, Gorur, Lakshminarayanan, "Do deep generative models know what they don't
know?", ICLR 2019). Two remedies from the literature, both on the bits/dim the model serves:

**Complexity-corrected score** (Serra, Alvarez, Gomez, Slizovskaia, Nunez, Luque, "Input
complexity and out-of-distribution detection with likelihood-based generative models", ICLR
2020). For an image x with D = H*W*C dimensions:

    bits(x)  = -log2 p_model(x) / D                          bits/dim, the served bits_per_dim
    L(x)     = 8 * len(PNG(x)) / D                           bits/dim, the complexity
    S(x)     = bits(x) - L(x)                                bits/dim, the score

L(x) is the length of a lossless compression of x, an estimate of -log2 p_0(x) / D under a
universal model p_0, so S(x) = -log2 (p_model(x) / p_0(x)) / D: a per-dimension log-likelihood
ratio (the paper's S(x) = -l_M(x) - L(x) with l_M the log-likelihood, in bits, normalised by
the dimensionality). Sign: larger S is more out-of-distribution, as is larger bits(x); a
threshold on S is the user's choice (the score itself has no parameter). The paper compares
PNG, JPEG2000 and FLIF; FLIF did best there, PNG is the compressor TensorFlow has as an op
(``tf.io.encode_png``, zlib level ``PNG_COMPRESSION``), so the score runs inside the SavedModel.
len(PNG(x)) counts the whole PNG file as ``tf.io.encode_png`` writes it: the 8-byte signature,
the IHDR chunk (25 bytes), one IDAT chunk per 8 KiB of zlib data (12 bytes of length, type and
CRC each around the zlib stream) and IEND (12 bytes). For images up to 8 KiB of compressed data
that is 57 bytes of fixed overhead: 456 / D bits/dim (0.445 at 32x32x1), a constant for a given
image shape that shifts S and leaves every ranking (and AUROC) unchanged; it is counted because
it is part of what the compressor needs to store x, as the paper counts compressed file lengths.

**Typicality test** (Nalisnick, Matsukawa, Teh, Lakshminarayanan, "Detecting out-of-distribution
inputs to deep generative models using typicality", 2019). For a batch of exactly M images:

    H_hat    = mean over the N training images of bits(x)    bits/dim
    d(batch) = | mean over the batch of bits(x) - H_hat |    bits/dim
    epsilon  = the alpha-quantile of d over K batches of M images drawn (each without
               replacement) from held-out in-distribution images that the model did not train on
    the batch is out-of-distribution when d(batch) > epsilon

It catches sets that are *too likely* as well as too unlikely (a typical set, not a
high-density region), but only for batches of inputs known to come from one source.
``TypicalityStatistics`` holds (H_hat, M, epsilon, alpha, K, ...); ``tfflows.export`` writes it
as the asset ``typicality.json`` beside ``config.json``.

Errors: images that are not uint8 [B, H, W, C] with C in 1..4 (PNG's grey, grey+alpha, RGB,
RGBA) are refused with a ValueError naming the problem; a NaN or Inf bits/dim is never turned
into a score (``NonFiniteError``); a typicality batch of another size than M is refused.
"""

import dataclasses
import json
import math

import numpy as np
import tensorflow as tf

from tfflows.models.flow_model import refuse_non_finite

PNG_COMPRESSION = 9  # zlib level of tf.io.encode_png (0-9; 9: the smallest files)
TYPICALITY_NAME = 'typicality.json'
SERVING_SEED = 0  # the served bits/dim's noise seed (tfflows.export.SERVING_SEED)


# ------------------------------------------------------------------------------- complexity
def png_lengths(images):
  """Bytes of the PNG file of each image: uint8 [B, H, W, C] -> int32 [B] (graph-friendly)."""
  images = _checked_uint8(images)
  encoded = tf.map_fn(lambda image: tf.io.encode_png(image, compression=PNG_COMPRESSION),
                      images, fn_output_signature=tf.TensorSpec([], tf.string))
  return tf.strings.length(encoded)


def complexity_bits_per_dim(images):
  """L(x) = 8 * len(PNG(x)) / D in bits/dim: uint8 [B, H, W, C] -> float32 [B]."""
  images = _checked_uint8(images)
  num_dims = math.prod(images.shape[1:])
  bits = tf.cast(png_lengths(images), tf.float32) * 8.
  # divide_no_nan (not '/') so that Grappler does not rewrite the division into a
  # multiplication by the reciprocal in the served graph (tfflows.export does the same).
  return tf.math.divide_no_nan(bits, tf.constant(float(num_dims), tf.float32))


def _checked_uint8(images):
  if not isinstance(images, tf.Tensor) or tf.executing_eagerly():
    array = np.asarray(images)
    if array.dtype != np.uint8:
      raise ValueError(f'Expected uint8 images [batch, H, W, C], got dtype {array.dtype}.')
    images = tf.convert_to_tensor(array)
  if images.dtype != tf.uint8:
    raise ValueError(f'Expected uint8 images [batch, H, W, C], got dtype {images.dtype.name}.')
  shape = images.shape
  if shape.rank != 4 or None in shape[1:]:
    raise ValueError(f'Expected images of shape [batch, H, W, C] with known H, W, C, got '
                     f'{shape}.')
  if not 1 <= shape[3] <= 4:
    raise ValueError(f'PNG holds 1 to 4 channels (grey, grey+alpha, RGB, RGBA); the images have '
                     f'{shape[3]}.')
  return images


# ---------------------------------------------------------------------------------- scores
def score(bits_per_dim, complexity):
  """S = bits(x) - L(x), float32 bits/dim (larger: more out-of-distribution). ``scores`` and
  the served ``ood`` signature refuse a NaN or Inf bits(x) before they get here."""
  bits_per_dim = tf.convert_to_tensor(bits_per_dim, tf.float32)
  return bits_per_dim - tf.convert_to_tensor(complexity, tf.float32)


def scores(model, images, num_samples=1, seed=SERVING_SEED):
  """Per-image OOD numbers of a FlowModel, the Python side of the export's ``ood`` signature.

  images: uint8 [B, H, W, C]. num_samples, seed: those of ``model.bits_per_dim`` (the served
  numbers use the export's k and seed 0). Returns numpy float32 [B] arrays:
  bits_per_dim (bits(x)), complexity_bits_per_dim (L(x)), score (S(x) = bits(x) - L(x)).
  Raises ValueError for bad images, NonFiniteError if the model gives NaN or Inf.
  """
  bits = model.bits_per_dim(images, num_samples, seed=seed)
  _refuse_non_finite(bits.numpy(), 'bits_per_dim')
  complexity = complexity_bits_per_dim(np.asarray(images))
  return {'bits_per_dim': bits.numpy(), 'complexity_bits_per_dim': complexity.numpy(),
          'score': score(bits, complexity).numpy()}


def batched_scores(model, images, batch_size=100, num_samples=1, seed=SERVING_SEED):
  """``scores`` over an array of any length, batch_size images at a time (same numbers)."""
  images = np.asarray(images)
  parts = [scores(model, images[i:i + batch_size], num_samples, seed)
           for i in range(0, len(images), batch_size)]
  if not parts:
    return {k: np.zeros([0], np.float32) for k in ('bits_per_dim', 'complexity_bits_per_dim',
                                                   'score')}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _refuse_non_finite(values, what):
  return refuse_non_finite(values, what, 'no score is computed from them')


# ------------------------------------------------------------------------------ typicality
@dataclasses.dataclass(frozen=True)
class TypicalityStatistics:
  """What the typicality test needs, in bits/dim of the served ``bits_per_dim``."""
  train_bits_per_dim: float   # H_hat: mean bits/dim of the training images
  batch_size: int             # M: images a tested batch holds
  epsilon: float              # threshold on |batch mean - H_hat|, bits/dim
  alpha: float                # epsilon is the alpha-quantile of the held-out distances
  num_bootstrap: int          # K: held-out batches drawn for epsilon
  num_train_images: int       # N of H_hat
  num_heldout_images: int     # held-out images the batches were drawn from
  num_importance_samples: int = 1  # k of the bits/dim (the export's)
  seed: int = 0               # of the bootstrap draws

  def __post_init__(self):
    for name in ('train_bits_per_dim', 'epsilon', 'alpha'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'TypicalityStatistics.{name} must be a finite number, got {value!r}.')
    for name in ('batch_size', 'num_bootstrap', 'num_train_images', 'num_heldout_images',
                 'num_importance_samples'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'TypicalityStatistics.{name} must be an integer >= 1, got {value!r}.')
    if not 0. < self.alpha < 1.:
      raise ValueError(f'TypicalityStatistics.alpha must lie in (0, 1), got {self.alpha}.')
    if self.epsilon < 0.:
      raise ValueError(f'TypicalityStatistics.epsilon must be >= 0, got {self.epsilon}.')

  def to_json(self):
    return json.dumps({'format': 'tfflows.ood.TypicalityStatistics', 'units': 'bits/dim',
                       **dataclasses.asdict(self)}, indent=2) + '\n'

  @classmethod
  def from_json(cls, text):
    try:
      values = json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(f'typicality statistics: not JSON ({error}).') from None
    if not isinstance(values, dict):
      raise ValueError('typicality statistics: expected a JSON object.')
    values.pop('format', None)
    values.pop('units', None)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f'typicality statistics: unknown fields {unknown}.')
    try:
      return cls(**values)
    except TypeError as error:
      raise ValueError(f'typicality statistics: {error}') from None


def typicality_statistics(train_bits_per_dim, heldout_bits_per_dim, batch_size, alpha=0.99,
                          num_bootstrap=1000, seed=0, num_importance_samples=1):
  """TypicalityStatistics from per-image bits/dim (1-D arrays): H_hat from the training
  images', epsilon from ``num_bootstrap`` batches of ``batch_size`` held-out images (each batch
  drawn without replacement by ``np.random.default_rng(seed)``)."""
  train = _refuse_non_finite(np.asarray(train_bits_per_dim, np.float64).ravel(),
                             'training bits_per_dim')
  heldout = _refuse_non_finite(np.asarray(heldout_bits_per_dim, np.float64).ravel(),
                               'held-out bits_per_dim')
  batch_size, num_bootstrap = int(batch_size), int(num_bootstrap)
  if batch_size < 1 or num_bootstrap < 1:
    raise ValueError(f'batch_size and num_bootstrap must be >= 1, got {batch_size} and '
                     f'{num_bootstrap}.')
  if not train.size:
    raise ValueError('typicality statistics need at least one training image.')
  if heldout.size < batch_size:
    raise ValueError(f'typicality batches of {batch_size} images need at least {batch_size} '
                     f'held-out images, got {heldout.size}.')
  if not 0. < alpha < 1.:
    raise ValueError(f'alpha must lie in (0, 1), got {alpha}.')
  entropy = float(train.mean())
  rng = np.random.default_rng(seed)
  distances = np.array([abs(heldout[rng.choice(heldout.size, batch_size, replace=False)].mean()
                            - entropy) for _ in range(num_bootstrap)])
  return TypicalityStatistics(
      train_bits_per_dim=entropy, batch_size=batch_size,
      epsilon=float(np.quantile(distances, alpha)), alpha=float(alpha),
      num_bootstrap=num_bootstrap, num_train_images=int(train.size),
      num_heldout_images=int(heldout.size), num_importance_samples=int(num_importance_samples),
      seed=int(seed))


def fit_typicality(model, train_images, heldout_images, batch_size, alpha=0.99,
                   num_bootstrap=1000, num_samples=1, seed=0, eval_batch_size=100):
  """TypicalityStatistics of a FlowModel: its served bits/dim (k = num_samples, noise seed 0)
  of the training images and of held-out images it did not train on (uint8 arrays, or
  iterables of uint8 batches)."""
  def bits(images):
    batches = [images] if isinstance(images, np.ndarray) else images
    values = [model.bits_per_dim(part[i:i + eval_batch_size], num_samples,
                                 seed=SERVING_SEED).numpy()
              for part in batches for i in range(0, len(part), eval_batch_size)]
    return np.concatenate(values) if values else np.zeros([0], np.float32)
  return typicality_statistics(bits(train_images), bits(heldout_images), batch_size, alpha,
                               num_bootstrap, seed, num_samples)


def typicality_distance(stats, bits_per_dim):
  """d = |mean(bits_per_dim) - H_hat| (bits/dim) of one batch of exactly M per-image bits/dim."""
  values = np.asarray(bits_per_dim, np.float64)
  if values.ndim != 1 or values.size != stats.batch_size:
    raise ValueError(f'the typicality test takes batches of exactly M = {stats.batch_size} '
                     f'images (the M its threshold was estimated for), got {values.size} '
                     f'(shape {list(values.shape)}).')
  _refuse_non_finite(values, 'bits_per_dim')
  return float(abs(values.mean() - stats.train_bits_per_dim))


def typicality_test(stats, bits_per_dim):
  """(d, is_out_of_distribution) of one batch of M per-image bits/dim: d > epsilon."""
  distance = typicality_distance(stats, bits_per_dim)
  return distance, distance > stats.epsilon


# ---------------------------------------------------------------------------------- AUROC
def auroc(in_distribution, out_of_distribution):
  """Area under the ROC curve of a score that is larger for out-of-distribution inputs:
  P(s_out > s_in) + P(s_out = s_in) / 2 over all pairs (the Mann-Whitney statistic, ties
  counted half). 1: perfect, 0.5: chance, below 0.5: the score ranks the wrong way."""
  inside = np.asarray(in_distribution, np.float64).ravel()
  outside = np.asarray(out_of_distribution, np.float64).ravel()
  if not inside.size or not outside.size:
    raise ValueError('auroc needs at least one score of each kind.')
  if not (np.isfinite(inside).all() and np.isfinite(outside).all()):
    raise ValueError('auroc: the scores hold NaN or Inf.')
  ranks = _average_ranks(np.concatenate([inside, outside]))
  rank_sum = ranks[inside.size:].sum()
  u = rank_sum - outside.size * (outside.size + 1) / 2.
  return float(u / (inside.size * outside.size))


def _average_ranks(values):
  """1-based ranks with ties given their average rank."""
  order = np.argsort(values, kind='mergesort')
  sorted_values = values[order]
  ranks = np.empty(values.size)
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  ends = np.r_[starts[1:], values.size]
  for start, end in zip(starts, ends):
    ranks[order[start:end]] = (start + 1 + end) / 2.
  return ranks
