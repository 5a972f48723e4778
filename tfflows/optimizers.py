"""Adamax and Adam whose per-variable update is one fused TensorFlow kernel.

Keras 3's optimizers spell each variable's update out in about 32 graph ops (casts, the bias
correction beta^t recomputed per variable, reads, element-wise ops, assigns). DenseFlow's
DF-74-10 has 3,793 weight tensors, so Keras' Adamax put about 129,000 of the 239,194 ops in its
training graph, which costs tracing memory, kernel-instantiation memory and per-op dispatch time
every step (with these kernels: 125,132 ops, 1.23 -> 1.36 images/s at batch 4 on 2 CPU cores). These subclasses keep Keras' slots, hyper-parameters, schedules, checkpoints
and distribution handling and replace only ``update_step`` by TensorFlow's fused training
kernels (they run on CPU and GPU and compile under XLA). With t = iterations + 1, lr the
learning rate and g the gradient:

    Adamax (``ResourceApplyAdaMax``):
        m <- beta1 m + (1 - beta1) g
        u <- max(beta2 u, |g|)
        w <- w - lr / (1 - beta1^t) * m / (u + epsilon)

    Adam (``ResourceApplyAdam``, amsgrad off):
        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2
        w <- w - lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

which are Keras' update rules (identical up to float rounding order). beta^t is computed once per
step, not once per variable.
"""

import keras
import tensorflow as tf


def _handle(variable):
  """The resource handle of a Keras 3 variable (or of a tf.Variable)."""
  return variable.value.handle if isinstance(variable, keras.Variable) else variable.handle


class _StepConstants:
  """The scalars every variable's kernel takes -- lr, beta_1, beta_2, epsilon and beta_1^t,
  beta_2^t with t = iterations + 1 -- made once per step, not once per variable."""

  _constants = None

  def _backend_update_step(self, grads, trainable_variables, learning_rate):
    self._constants = self._step_constants(learning_rate)
    try:
      return super()._backend_update_step(grads, trainable_variables, learning_rate)
    finally:
      self._constants = None

  def _step_constants(self, learning_rate):
    step = tf.cast(self.iterations + 1, tf.float32)
    beta_1, beta_2 = tf.constant(self.beta_1, tf.float32), tf.constant(self.beta_2, tf.float32)
    return dict(lr=tf.cast(learning_rate, tf.float32), beta1=beta_1, beta2=beta_2,
                epsilon=tf.constant(self.epsilon, tf.float32),
                beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step))

  def _kernel_args(self, gradient, variable, learning_rate, names):
    constants = self._constants or self._step_constants(learning_rate)
    args = {name: tf.cast(constants[name], variable.dtype) for name in names}
    return dict(args, var=_handle(variable), grad=tf.cast(gradient, variable.dtype))


@keras.saving.register_keras_serializable(package='tfflows')
class FusedAdamax(_StepConstants, keras.optimizers.Adamax):
  """``keras.optimizers.Adamax`` with one fused kernel per variable (see the module doc)."""

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    return tf.raw_ops.ResourceApplyAdaMax(
        m=_handle(self._m[index]), v=_handle(self._u[index]),
        **self._kernel_args(gradient, variable, learning_rate,
                            ('lr', 'beta1', 'beta2', 'epsilon', 'beta1_power')))


@keras.saving.register_keras_serializable(package='tfflows')
class FusedAdam(_StepConstants, keras.optimizers.Adam):
  """``keras.optimizers.Adam`` with one fused kernel per variable (see the module doc)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if self.amsgrad:
      raise ValueError('FusedAdam does not implement amsgrad; use keras.optimizers.Adam.')

  def update_step(self, gradient, variable, learning_rate):
    index = self._get_variable_index(variable)
    return tf.raw_ops.ResourceApplyAdam(
        m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
        **self._kernel_args(gradient, variable, learning_rate,
                            ('lr', 'beta1', 'beta2', 'epsilon', 'beta1_power', 'beta2_power')))

