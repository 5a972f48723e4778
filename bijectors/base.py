"""The base class of every tfflows bijector.

A tfflows bijector maps in the *normalizing* direction: ``forward`` takes data towards the
latent, ``inverse`` generates. Its trainable parameters are Keras weights owned by Keras layers
that the bijector declares (``self.layers``); the bijector itself owns no variable.

Subclasses implement the two one-pass methods

    _forward_and_log_det(x)  -> (y, log|det dy/dx|)     log-det of shape [B] (or a scalar)
    _inverse_and_log_det(y)  -> (x, log|det dx/dy|)

for inputs with exactly one batch axis, [B, H, W, C] (each tensor of a structure, and every
conditioning tensor such as ``context=`` or ``noise=``). The public ``forward_and_log_det`` /
``inverse_and_log_det`` accept any number of leading axes (none: one event, with a scalar
log-det; several: sample and batch axes) and fold them into one around the subclass method
(``bijectors.batching``), so every bijector and everything built from them (chains, the
multi-scale flow, TFP distributions over it) has TFP's shape contract in one place. An input
that already has one batch axis passes through without any added op.

The TFP methods (``forward``, ``inverse``, ``forward_log_det_jacobian``, ...) are derived from
the one-pass methods. The training path calls ``forward_and_log_det`` directly, so a network is
evaluated once per step; the TFP methods exist so that every piece composes with TensorFlow
Probability:

* ``variables`` / ``trainable_variables`` are the tf.Variables of the Keras weights of
  ``self.layers`` -- exactly those: TFP's ``tf.Module`` walk (``dist.trainable_variables`` of a
  distribution built on the bijector) sees only them, never attributes such as template
  layers or member bijectors;
* ``experimental_batch_shape()`` is [] (the parameters are shared by every event);
* subclasses whose log-det does not depend on x pass ``is_constant_jacobian=True``.
"""

import collections.abc

import tensorflow as tf
import tensorflow_probability as tfp

from bijectors import batching

tfb = tfp.bijectors

EVENT_NDIMS = batching.EVENT_NDIMS  # images: (H, W, C)
_VARIABLES_ATTRIBUTE = '_declared_variables'


class LayerVariables(collections.abc.Mapping):
  """A read-only view {index: tf.Variable} of the Keras weights of ``layers``, evaluated on
  access (a layer built later shows its weights). Held by a ``tf.Module`` attribute, it is what
  the module's variable walk finds. Iterating takes a snapshot that item access then reads, so
  a walk over n variables costs one pass over the layers, not n."""

  def __init__(self, layers):
    self._layers = list(layers)
    self._snapshot = None

  def _variables(self):
    seen, out = set(), []
    for layer in self._layers:
      for weight in layer.weights:
        if id(weight) not in seen:
          seen.add(id(weight))
          out.append(weight.value)  # the backend tf.Variable of the Keras weight
    self._snapshot = out
    return out

  def __getitem__(self, index):
    return (self._snapshot if self._snapshot is not None else self._variables())[index]

  def __iter__(self):
    return iter(range(len(self._variables())))

  def __len__(self):
    return len(self._variables())


def attach_layer_variables(module, layers):
  """Makes ``module``'s ``tf.Module`` variable walk find the weights of ``layers`` (an
  untracked attribute: checkpoints and SavedModels are unchanged). With a
  ``_TF_MODULE_IGNORED_PROPERTIES`` property returning ``ignored_properties(module)`` the walk
  finds exactly those and nothing else."""
  setattr(module, _VARIABLES_ATTRIBUTE, module._no_dependency(LayerVariables(layers)))  # pylint: disable=protected-access
  return module


def ignored_properties(module):
  """Every attribute of ``module`` but the one ``attach_layer_variables`` sets."""
  return frozenset(vars(module)) - {_VARIABLES_ATTRIBUTE}


class FlowBijector(tfb.Bijector):
  """An event-rank-3 bijector whose parameters live in Keras layers."""

  def __init__(self, name, layers=(), is_constant_jacobian=False,
               forward_min_event_ndims=EVENT_NDIMS, inverse_min_event_ndims=None):
    self._keras_layers = list(layers)
    super().__init__(
        forward_min_event_ndims=forward_min_event_ndims,
        inverse_min_event_ndims=(forward_min_event_ndims if inverse_min_event_ndims is None
                                 else inverse_min_event_ndims),
        is_constant_jacobian=is_constant_jacobian,
        validate_args=False,
        parameters={},
        name=name)
    attach_layer_variables(self, self._keras_layers)

  @property
  def layers(self):
    """The Keras layers that own this bijector's weights (register them with the model)."""
    return list(self._keras_layers)

  @property
  def _TF_MODULE_IGNORED_PROPERTIES(self):  # pylint: disable=invalid-name
    """tf.Module's variable walk sees only the declared layers' weights (module docstring)."""
    return ignored_properties(self)

  @classmethod
  def _parameter_properties(cls, dtype):
    """No batch of parameters: the weights are shared by every event (batch shape [])."""
    return {}

  # -- the one-pass API ---------------------------------------------------------------------
  def forward_and_log_det(self, x, **condition):
    """Returns (y, fldj) for x [..., H, W, C] (any number of leading axes, a structure for
    multipart bijectors); fldj has the leading shape (a scalar for one event), or is a scalar
    when it is the same for every event.

    ``condition`` holds keyword inputs of conditional bijectors (``context=``, ``noise=``),
    with the same leading axes as x. Raises ValueError for an input of rank < 3.
    """
    return self._call_batched(self._forward_and_log_det, x, condition, 'forward')

  def inverse_and_log_det(self, y, **condition):
    """Returns (x, ildj), the inverse of ``forward_and_log_det`` (same shape rules)."""
    return self._call_batched(self._inverse_and_log_det, y, condition, 'inverse')

  def inverse_with_noise(self, y, **condition):
    """Augmented bijectors (with ``noise_shapes``, DenseFlow's cross-unit coupling): y ->
    (x, [e_1, ...], ildj), recovering the augmentation noise the forward map consumed (same
    shape rules as ``inverse_and_log_det``)."""
    return self._call_batched(self._inverse_with_noise, y, condition, 'inverse')

  def _inverse_with_noise(self, y, **condition):
    raise NotImplementedError(f'{self.name} ({type(self).__name__}) consumes no noise.')

  def _call_batched(self, method, x, condition, direction):
    """Runs ``method`` (returning (outputs..., log_det)) on x and ``condition`` with their
    leading axes folded into one, and unfolds what it returns."""
    what = f'{self.name} ({type(self).__name__}) {direction}'
    folded, leading = batching.fold(x, what=f'{what} input')
    self._check_event(folded, direction)
    if leading is None:
      return method(folded, **condition)
    condition = {k: batching.fold_like(v, leading, what=f'{what} {k}=')
                 for k, v in condition.items()}
    *outputs, log_det = method(folded, **condition)
    dtype = tf.nest.flatten(outputs[0])[0].dtype
    return (*batching.unfold(outputs, leading),
            batching.unfold_log_det(log_det, leading, dtype))

  def _check_event(self, x, direction):
    """Static checks of the input event before the subclass runs (ValueError naming the
    problem). By default: the channel count, for bijectors with a ``channels`` attribute that
    keep it (couplings, ActNorm, 1x1 convolutions)."""
    channels = getattr(self, 'channels', None)
    if channels is None or not isinstance(x, tf.Tensor):
      return
    if x.shape[-1] is not None and x.shape[-1] != channels:
      raise ValueError(f'{self.name} ({type(self).__name__}) {direction}: expected '
                       f'{channels} channels, got shape {x.shape}.')

  def _forward_and_log_det(self, x, **condition):
    raise NotImplementedError

  def _inverse_and_log_det(self, y, **condition):
    raise NotImplementedError

  # -- TFP methods derived from the one-pass API --------------------------------------------
  def _forward(self, x, **condition):
    return self.forward_and_log_det(x, **condition)[0]

  def _inverse(self, y, **condition):
    return self.inverse_and_log_det(y, **condition)[0]

  def _forward_log_det_jacobian(self, x, **condition):
    return self._batch_log_det(self.forward_and_log_det(x, **condition)[1], x)

  def _inverse_log_det_jacobian(self, y, **condition):
    return self._batch_log_det(self.inverse_and_log_det(y, **condition)[1], y)

  def _batch_log_det(self, log_det, x):
    """A log-det of the leading shape of x (a scalar log-det, the same for every event, is
    broadcast): TFP's log-det methods give one value per event."""
    x0 = tf.nest.flatten(x)[0]
    return log_det + tf.zeros(tf.shape(x0)[:-EVENT_NDIMS], log_det.dtype)


def noise_shapes(bijector):
  """The [H, W, C] shapes of the augmentation noise ``bijector`` consumes (empty for all but
  augmented bijectors, DenseFlow's cross-unit coupling and chains holding it)."""
  return tuple(getattr(bijector, 'noise_shapes', ()))


def forward_consuming(bijector, x, noise, **condition):
  """(y, log-det, rest of noise): ``bijector``'s forward pass handed the first
  len(noise_shapes(bijector)) tensors of the flat noise list (as ``noise=``), in order. The
  one routing of augmentation noise through a sequence of bijectors (``AugmentedChain``, the
  levels of ``MultiScaleFlow``)."""
  num = len(noise_shapes(bijector))
  if num:
    condition = dict(condition, noise=list(noise[:num]))
  y, log_det = bijector.forward_and_log_det(x, **condition)
  return y, log_det, list(noise[num:])


def inverse_recovering(bijector, y, **condition):
  """(x, recovered noise list, ildj) of any bijector: the inverse of ``forward_consuming``
  (an empty list for a bijector that consumes no noise)."""
  if noise_shapes(bijector):
    return bijector.inverse_with_noise(y, **condition)
  x, ildj = bijector.inverse_and_log_det(y, **condition)
  return x, [], ildj


def sum_event(t):
  """Sums a [B, H, W, C] tensor over its event dimensions, giving [B]."""
  return tf.reduce_sum(t, axis=[-3, -2, -1])


def num_pixels(x):
  """H * W of an event-rank-3 tensor as a float, from its static shape."""
  return float(x.shape[-3] * x.shape[-2])


class Chain(FlowBijector):
  """Applies bijectors in order: forward is b_n(...b_2(b_1(x))); log-dets add up."""

  def __init__(self, bijectors, name='chain'):
    self.bijectors = list(bijectors)
    super().__init__(name=name, layers=[l for b in self.bijectors for l in b.layers])

  def _forward_and_log_det(self, x, **condition):
    total = 0.
    for b in self.bijectors:
      x, ldj = b.forward_and_log_det(x, **condition)
      total = total + ldj
    return x, total

  def _inverse_and_log_det(self, y, **condition):
    total = 0.
    for b in reversed(self.bijectors):
      y, ildj = b.inverse_and_log_det(y, **condition)
      total = total + ildj
    return y, total

  def _forward_event_shape(self, s):
    for b in self.bijectors:
      s = b.forward_event_shape(s)
    return s

  def _inverse_event_shape(self, s):
    for b in reversed(self.bijectors):
      s = b.inverse_event_shape(s)
    return s

  def _forward_event_shape_tensor(self, s):
    for b in self.bijectors:
      s = b.forward_event_shape_tensor(s)
    return s

  def _inverse_event_shape_tensor(self, s):
    for b in reversed(self.bijectors):
      s = b.inverse_event_shape_tensor(s)
    return s
