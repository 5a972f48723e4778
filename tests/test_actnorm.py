import numpy as np
import pytest
import tensorflow as tf

from bijectors.actnorm import ActNorm
from tests import flow_checks


def test_data_dependent_init_normalises_first_batch():
  b = ActNorm(3)
  x = tf.random.normal([16, 4, 4, 3]) * 3. + 2.
  y, _ = b.forward_and_log_det(x)
  np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2)), 0., atol=1e-5)
  np.testing.assert_allclose(np.std(y, axis=(0, 1, 2)), 1., atol=1e-4)
  assert float(b.params.initialized.numpy()) == 1.
  # A second batch does not re-initialise.
  loc = b.params.loc.numpy().copy()
  b.forward_and_log_det(x * 5.)
  np.testing.assert_array_equal(b.params.loc.numpy(), loc)


def test_invertible_and_log_det(float64):
  b = ActNorm(2)
  x = tf.random.normal([3, 2, 3, 2], dtype=tf.float64) * 2. + 1.
  b.forward_and_log_det(x)  # initialise
  flow_checks.assert_invertible(b, x)
  flow_checks.assert_log_det_matches_jacobian(b, x)


@pytest.mark.parametrize('jit_compile', [False, True])
def test_unknown_batch(jit_compile):
  b = ActNorm(3)
  x = tf.random.normal([5, 4, 4, 3])
  b.forward_and_log_det(x)
  flow_checks.assert_unknown_batch(b, x, jit_compile)
