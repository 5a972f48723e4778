"""Shared checks of flow mathematics, used by the tests of every bijector and model.

All checks run eagerly in float64 on small inputs unless they say otherwise.
"""

import numpy as np
import tensorflow as tf


def assert_invertible(bijector, x, atol=1e-5, **condition):
  """inverse(forward(x)) == x, and the two log-dets are negatives of each other."""
  y, fldj = bijector.forward_and_log_det(x, **condition)
  x_back, ildj = bijector.inverse_and_log_det(y, **condition)
  np.testing.assert_allclose(_np(x_back), _np(x), atol=atol)
  batch = tf.nest.flatten(x)[0].shape[0]
  np.testing.assert_allclose(_per_example(fldj, batch), -_per_example(ildj, batch), atol=atol)
  return y


def assert_log_det_matches_jacobian(bijector, x, atol=1e-6, **condition):
  """The bijector's forward log-det equals log|det J| of the autodiff Jacobian, per example.

  x: a float64 tensor [B, H, W, C] with small H*W*C (the Jacobian is (HWC)^2 per example).
  The output may have a different shape than x (e.g. squeeze) but must have the same size.
  """
  batch = x.shape[0]
  _, fldj = bijector.forward_and_log_det(x, **condition)
  fldj = _per_example(fldj, batch)
  for b in range(batch):
    jac = autodiff_jacobian(lambda xb: bijector.forward_and_log_det(xb, **condition)[0],
                            x[b:b + 1])
    assert jac.shape[0] == jac.shape[1], f'not square: {jac.shape}'
    _, logabsdet = np.linalg.slogdet(jac)
    np.testing.assert_allclose(fldj[b], logabsdet, atol=atol, rtol=1e-6)


def autodiff_jacobian(fn, x):
  """The Jacobian of fn at x from autodiff, as a numpy array [output size, input size].

  x: a tensor or a structure of tensors (one example); fn's output likewise; both are
  flattened in ``tf.nest`` order. ``GradientTape.jacobian`` (one backward pass a row, no
  vectorisation, which the flows' while loops do not support) runs in one ``tf.function``:
  the rows are a graph loop instead of an eager backward pass each.
  """
  parts = [tf.convert_to_tensor(t) for t in tf.nest.flatten(x)]

  @tf.function(autograph=False)
  def jacobian(*parts):
    parts = list(parts)
    with tf.GradientTape() as tape:
      tape.watch(parts)
      flat = flatten(fn(tf.nest.pack_sequence_as(x, parts)))
    rows = tape.jacobian(flat, parts, experimental_use_pfor=False)
    return tf.concat([tf.reshape(r, [flat.shape[0], -1]) for r in rows], 1)

  return jacobian(*parts).numpy()


def flatten(structure):
  """A structure of tensors as one vector, in ``tf.nest`` order."""
  return tf.concat([tf.reshape(t, [-1]) for t in tf.nest.flatten(structure)], 0)


def assert_unknown_batch(bijector, x, jit_compile):
  """forward/inverse trace with a [None, H, W, C] signature (optionally under XLA) and agree
  with the eager results."""
  spec = tf.TensorSpec([None] + list(x.shape[1:]), x.dtype)
  fwd = tf.function(lambda t: bijector.forward_and_log_det(t), input_signature=[spec],
                    jit_compile=jit_compile)
  y, ldj = fwd(x)
  y_eager, ldj_eager = bijector.forward_and_log_det(x)
  np.testing.assert_allclose(_np(y), _np(y_eager), atol=1e-5)
  np.testing.assert_allclose(_per_example(ldj, x.shape[0]), _per_example(ldj_eager, x.shape[0]),
                             atol=1e-4, rtol=1e-5)
  out_spec = tf.TensorSpec([None] + list(y.shape[1:]), y.dtype)
  inv = tf.function(lambda t: bijector.inverse_and_log_det(t), input_signature=[out_spec],
                    jit_compile=jit_compile)
  x_back, _ = inv(y)
  np.testing.assert_allclose(_np(x_back), _np(x), atol=1e-4)


def _np(t):
  return np.concatenate([np.reshape(np.asarray(v), [-1]) for v in tf.nest.flatten(t)])


def _per_example(ldj, batch):
  return np.broadcast_to(np.asarray(ldj, dtype=np.float64), [batch])


def first_level_networks(model):
  """The weights of the coupling networks of a Glow's first level (its steps' convolutions,
  stacked over the steps or one step's), for tests that poison a model: set to 1e30 they are
  finite weights whose model gives NaN."""
  weights = [w for w in model.weights
             if w.path.startswith('level0_') and 'conv_' in w.path.split('/', 1)[-1]]
  if not weights:
    raise ValueError('no coupling-network weights under level0_ in this model')
  return weights


def one_step_model(config_fields, random_seed):
  """A tiny model after one SGD step on 8 random 8x8 images: ActNorm initialised and the
  zero-initialised layers non-zero, so exports and scores are tested on a model that is not
  the identity. config_fields: FlowConfig keyword fields; random_seed: keras.utils seed."""
  import keras  # pylint: disable=import-outside-toplevel
  import tfflows  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(random_seed)
  model = tfflows.build_model(tfflows.FlowConfig(**config_fields))
  model.compile(keras.optimizers.SGD(1e-2))
  images = np.random.RandomState(1).randint(0, 256, size=(8, 8, 8, 1)).astype(np.uint8)
  model.fit(images, epochs=1, batch_size=8, verbose=0)
  return model
