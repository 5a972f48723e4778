"""PyTorch's default initialisation of a convolution, for the networks DenseFlow's official code
(PyTorch) defines and tfflows reproduces.

``torch.nn.Conv2d`` initialises (``reset_parameters``: Kaiming-uniform with a = sqrt(5)) its
kernel and bias, with fan_in = kernel_h * kernel_w * in_channels, as

    kernel ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bias   ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))

Keras' defaults differ: Glorot-uniform kernels, U(-sqrt(6/(fan_in + fan_out)), ...), and zero
biases. For DenseFlow's 1x1 convolutions c -> c that is a kernel variance 3 times PyTorch's, and
trained side by side on the same data tfflows' DenseFlow learned slower with Keras'
initialisation (docs/official_comparison.md).

The kernel initialiser is Keras' own ``VarianceScaling(scale=1/3, mode='fan_in',
distribution='uniform')`` (bound sqrt(3 * scale / fan_in) = 1/sqrt(fan_in)); the bias bound
needs the kernel's fan-in, which this ``Conv2D`` computes when it is built.
"""

import math

import keras


def kernel_initializer():
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a kernel [kh, kw, in, out]."""
  return keras.initializers.VarianceScaling(scale=1. / 3., mode='fan_in',
                                            distribution='uniform')


@keras.saving.register_keras_serializable(package='tfflows')
class Conv2D(keras.layers.Conv2D):
  """``keras.layers.Conv2D`` with PyTorch's default initialisation (see the module docstring):
  kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Other arguments as Keras' Conv2D;
  explicit ``kernel_initializer`` / ``bias_initializer`` arguments are not accepted."""

  def __init__(self, filters, kernel_size, **kwargs):
    for name in ('kernel_initializer', 'bias_initializer'):
      if name in kwargs:
        raise ValueError(f'torch_init.Conv2D sets its own {name}.')
    super().__init__(filters, kernel_size, kernel_initializer=kernel_initializer(), **kwargs)

  def build(self, input_shape):
    fan_in = int(input_shape[-1]) * math.prod(self.kernel_size)
    bound = 1. / math.sqrt(fan_in)
    self.bias_initializer = keras.initializers.RandomUniform(-bound, bound)
    super().build(input_shape)

  def get_config(self):
    config = super().get_config()
    config.pop('kernel_initializer', None)
    config.pop('bias_initializer', None)
    return config
