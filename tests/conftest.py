"""Test configuration: quiet TensorFlow, the CPU as two logical devices, float32 by default,
and a float64 fixture."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, set before TensorFlow initialises its devices, so that
# MirroredStrategy over two replicas runs in the test process (the split `--num_cpu_devices=2`
# makes, which train.main.configure_devices then leaves as it is); everything else places its
# ops on the first, as on one CPU.
tf.config.set_logical_device_configuration(tf.config.list_physical_devices('CPU')[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture
def float64():
  """Builds Keras layers in float64 for the duration of a test (Jacobian checks)."""
  keras.config.set_floatx('float64')
  keras.config.set_dtype_policy('float64')
  yield tf.float64
  keras.config.set_floatx('float32')
  keras.config.set_dtype_policy('float32')


@pytest.fixture(autouse=True)
def _seed():
  keras.utils.set_random_seed(1234)
