"""Fused Adamax / Adam: the same updates as Keras' optimizers, far fewer graph ops."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfflows import optimizers

PAIRS = [(keras.optimizers.Adamax, optimizers.FusedAdamax),
         (keras.optimizers.Adam, optimizers.FusedAdam)]


def _run(optimizer_cls, mode, steps=5, learning_rate=0.05):
  """Weights after ``steps`` updates of two variables with fixed random gradients."""
  rng = np.random.RandomState(0)
  weights = [keras.Variable(rng.randn(3, 4).astype(np.float32)),
             keras.Variable(rng.randn(5).astype(np.float32))]
  gradients = [[tf.constant(rng.randn(*w.shape).astype(np.float32)) for w in weights]
               for _ in range(steps)]
  optimizer = optimizer_cls(learning_rate=learning_rate)
  optimizer.build(weights)

  def step(grads):
    optimizer.apply(grads, weights)

  if mode != 'eager':
    step = tf.function(step, jit_compile=mode == 'xla')
  for grads in gradients:
    step(grads)
  return [w.numpy() for w in weights], int(optimizer.iterations.numpy())


@pytest.mark.parametrize('keras_cls,fused_cls', PAIRS)
@pytest.mark.parametrize('mode', ['eager', 'function', 'xla'])
def test_fused_matches_keras(keras_cls, fused_cls, mode):
  expected, expected_steps = _run(keras_cls, mode)
  got, steps = _run(fused_cls, mode)
  assert steps == expected_steps == 5
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    assert np.abs(g - e).max() < np.abs(e).max()   # and the weights did move from the same start


def test_fused_graph_is_small():
  """One kernel per variable: the traced update has far fewer ops than Keras' own."""
  weights = [keras.Variable(np.zeros([2, 2], np.float32)) for _ in range(20)]
  counts = {}
  for cls in (keras.optimizers.Adamax, optimizers.FusedAdamax):
    optimizer = cls(1e-3)
    optimizer.build(weights)
    fn = tf.function(lambda grads, o=optimizer: o.apply(grads, weights))
    graph = fn.get_concrete_function([tf.TensorSpec([2, 2])] * 20).graph
    counts[cls.__name__] = len(graph.get_operations())
  assert counts['FusedAdamax'] * 3 < counts['Adamax'], counts


def test_slots_are_keras_weights_and_checkpoint():
  """Moments live in the optimizer's Keras variables (so checkpoints keep them)."""
  weight = keras.Variable(np.ones([3], np.float32))
  optimizer = optimizers.FusedAdamax(0.1)
  optimizer.build([weight])
  optimizer.apply([tf.constant([1., -2., 3.])], [weight])
  m, u = optimizer._m[0].numpy(), optimizer._u[0].numpy()   # pylint: disable=protected-access
  np.testing.assert_allclose(m, 0.1 * np.array([1., -2., 3.]), rtol=1e-6)
  np.testing.assert_allclose(u, [1., 2., 3.], rtol=1e-6)
  assert {id(v) for v in (optimizer._m[0], optimizer._u[0])} <= {   # pylint: disable=protected-access
      id(v) for v in optimizer.variables}


def test_amsgrad_is_refused():
  with pytest.raises(ValueError, match='amsgrad'):
    optimizers.FusedAdam(1e-3, amsgrad=True)
