"""K flow steps of one architecture run as one loop over stacked parameters.

A multi-scale flow repeats one step architecture many times: K steps per Glow or mAR-SCF level,
the steps of a DenseFlow unit, RealNVP's alternating couplings. Unrolled, every step is its own
copy of the graph, so tracing, lowering and XLA's compile time and the host memory of the graph
grow with K. ``Repeated`` runs the K steps as one ``tf.while_loop`` (XLA compiles its body once)
whose body is one step, the *template*, evaluated with the parameters theta_k of step k:

    forward:  x_0 = x,  x_{k+1} = f(x_k; theta_k)  for k = 0 .. K-1,  y = x_K
              log|det dy/dx| = sum_k log|det df/dx (x_k; theta_k)|           (one pass)
    inverse:  x_k = f^{-1}(x_{k+1}; theta_k)  for k = K-1 .. 0

Stacked parameters. For every variable v of the template (the weights of its Keras layers and
the states of their SeedGenerators, in Keras' traversal order), the Keras layer
``StackedWeights`` owns one weight of shape [K, *v.shape] with v's dtype, trainable flag and
aggregation. Its initial value is the stack of K independently built steps (``make_step(k)``
for k = 0 .. K-1, built in that order), so each step starts from its own random initialisation
exactly as in the unrolled flow (orthogonal 1x1 convolutions, dropout seeds, ...). The template
is the step built first; its own variables are never read (a ``keras.StatelessScope`` maps
each of them to its slice theta_k), and neither the template nor its layers belong to
``self.layers``: models, checkpoints and optimizers see the stacked weights only.

State updated by a step -- batch-norm moving statistics in training, dropout's seed state,
and ActNorm's parameters and ``initialized`` flag during data-dependent initialisation
(``bijectors.actnorm.data_initialization()``) -- is read from the scope after each step,
collected per step, and assigned to the stacked weights after the loop, so step k + 1 runs on
the output of the already updated step k, as in the unrolled flow.

Per-step data: ``step_kwargs`` maps a keyword to K values; step k is called with the k-th
(RealNVP's couplings alternate their mask: ``parity=[0, 1, 0]``).

Rematerialisation (``remat=True``): the step's activations are not kept for the backward pass.
The loop has its own gradient (a ``tf.custom_gradient`` around it): the forward loop keeps only
the input of every step; a backward loop runs the steps in reverse order, recomputing step k
from its input and theta_k under a tape and writing d/d theta_k to slot k of the stacked
weights' gradients. The backward pass holds one step's activations plus the K step inputs, and
the graph holds the step twice (forward; recomputation with its gradient) instead of the
forward step, its gradient and an accumulator for every intermediate the gradient needs. The
gradients are the same; Keras' ``training`` mode and the dropout seeds of the forward pass are
those of the recomputation.

Reading the parameters: the loop packs the stacked weights of one dtype into one [K, N] array
(the flattened weights side by side) and reads row k of it from a TensorArray, instead of one
TensorArray a weight. Every array a ``tf.while_loop`` reads is one of its loop variables, with
its own read, gradient write and stacking; packed, a DenseFlow step's ~155 weights are one or
two. The cost is one copy of the weights (the concatenation) while the step runs. The remat
loop's reads carry no gradient and stay one gather a weight (no copy of all K).

This loop is the only way the steps run, for every K >= 1 (one step is a loop of one
iteration): the numbers are those of K separately built steps run one after the other with the
values of the slices (tests/test_repeated.py builds that reference). For K = 2 the loop still
costs a little more to build than the two steps traced in turn (while_loop's gradient keeps an
accumulator for every intermediate it needs): on SMALL DenseFlow's units of 2 steps, 3% more
graph ops, a slower first call and 0.2 GB more peak memory, the same time a training step
(docs/results.md); the deep configurations (groups of 3 to 32 steps) are what the loop is for.

Checkpoints written before the loops existed hold one set of variables per step; the program
``train/convert_checkpoint.py`` converts them, along the map between the two layouts that
``train.checkpoint_contents.unrolled_variable_layout`` gives.
"""

import keras
import numpy as np
import tensorflow as tf

from bijectors import base
from bijectors import keras_compat


class _Hidden:
  """Holds an object out of sight of Keras' and tf.Module's attribute tracking."""

  __slots__ = ('value',)

  def __init__(self, value):
    self.value = value


def step_variables(step):
  """The variables of a step's Keras layers, each once, in Keras' traversal order (the order
  of ``model.variables`` for these layers: each layer's weights, seed states, sublayers)."""
  seen, result = set(), []
  for layer in step.layers:
    for v in layer.variables:
      if id(v) not in seen:
        seen.add(id(v))
        result.append(v)
  return result


class StackedWeights(keras.layers.Layer):
  """For every variable v of a template step, a weight [K, *v.shape] (see the module doc).

  ``ordered`` lists the stacked weights in the template's variable order (``variables`` lists
  Keras' order, trainable ones first); ``template_layers`` are the template's Keras layers
  (not sublayers of this one); ``stacked(v)`` is the stacked weight of template variable v.
  """

  def __init__(self, template_variables, template_layers, initial_values, **kwargs):
    super().__init__(**kwargs)
    self.num_steps = int(initial_values[0].shape[0]) if initial_values else 0
    ordered, by_id = [], {}
    for j, (v, value) in enumerate(zip(template_variables, initial_values)):
      w = self.add_weight(shape=value.shape, dtype=v.dtype, trainable=v.trainable,
                          initializer='zeros', autocast=False,
                          aggregation=getattr(v, 'aggregation', 'none'),
                          name=f'{j}_{_short_path(v)}')
      w.assign(value)
      ordered.append(w)
      by_id[id(v)] = w
    self._hidden = _Hidden((tuple(ordered), by_id, tuple(template_layers),
                            tuple(template_variables)))
    self.built = True  # every weight exists now (Keras' rule: a layer whose __init__ makes them)

  @property
  def ordered(self):
    return list(self._hidden.value[0])

  @property
  def template_layers(self):
    return list(self._hidden.value[2])

  def stacked(self, template_variable):
    """The stacked weight [K, ...] of a template variable (KeyError if it has none)."""
    return self._hidden.value[1][id(template_variable)]

  def call(self, x):  # not used: the Repeated bijector reads the weights
    return x

  def slice_mapping(self, k):
    """[(template variable, value of step k)] for a ``keras.StatelessScope``."""
    return [(v, w[k]) for v, w in zip(self._hidden.value[3], self.ordered)]

  def actnorm_state(self):
    """(uninitialised ActNorms, unscaled channels) over the K steps of the template layers
    and their sublayers that report them (``actnorm_state(model)`` sums this over a model)."""
    reporting = {id(l): l for t in self.template_layers
                 for l in t._flatten_layers(include_self=True)  # pylint: disable=protected-access
                 if hasattr(l, 'actnorm_state')}.values()
    fresh = unscaled = 0
    for k in range(self.num_steps if reporting else 0):
      with keras.StatelessScope(self.slice_mapping(k)):
        for layer in reporting:
          f, u = layer.actnorm_state()
          fresh, unscaled = fresh + f, unscaled + u
    return fresh, unscaled


def _short_path(v):
  """A variable's path without the step's own layer prefix, as a weight name."""
  parts = v.path.split('/')
  return '.'.join(parts[1:] if len(parts) > 1 else parts)


# -- ActNorm's data initialisation ----------------------------------------------------------------
def _in_data_initialization():
  from bijectors import actnorm  # pylint: disable=import-outside-toplevel
  probe = getattr(actnorm, 'in_data_initialization', None)
  return bool(probe()) if probe is not None else False


# -- the bijector ---------------------------------------------------------------------------------
class Repeated(base.FlowBijector):
  """K steps ``make_step(0) .. make_step(K-1)`` as one loop over stacked weights.

  make_step(k): builds step k, a shape-preserving ``FlowBijector`` (name its layers after k);
    every step must have the same variables (shapes and dtypes), and the steps differ only by
    their parameters and ``step_kwargs``.
  num_steps: K >= 1.
  event_shape: (H, W, C) of the steps' input, used to build layers that build on first call
    (one inverse pass on zeros, which leaves ActNorm uninitialised).
  step_kwargs: {keyword: K values}: step k gets keyword=values[k].
  remat: recompute each step's activations in the backward pass (see the module doc).
  """

  def __init__(self, make_step, num_steps, event_shape=None, remat=False, step_kwargs=None,
               name='repeated'):
    num_steps = int(num_steps)
    if num_steps < 1:
      raise ValueError(f'{name}: num_steps must be >= 1, got {num_steps}.')
    self.num_steps = num_steps
    self.remat = bool(remat)
    self.event_shape = None if event_shape is None else tuple(int(d) for d in event_shape)
    self.step_kwargs = {k: np.asarray(v) for k, v in (step_kwargs or {}).items()}
    for key, values in self.step_kwargs.items():
      if values.shape[:1] != (num_steps,):
        raise ValueError(f'{name}: step_kwargs[{key!r}] needs {num_steps} values (one a step), '
                         f'got shape {values.shape}.')
    self.stacked = self._build_stacked(make_step, name)
    super().__init__(name=name, layers=[self.stacked])

  # -- construction -------------------------------------------------------------------------
  def _build_stacked(self, make_step, name):
    """Builds the K steps in order, keeps the first as the template and stacks the values of
    every variable into one ``StackedWeights`` layer."""
    template = self._built(make_step(0))
    variables = step_variables(template)
    values = [np.empty((self.num_steps,) + tuple(v.shape), _np_dtype(v)) for v in variables]
    for j, v in enumerate(variables):
      values[j][0] = np.asarray(v.numpy())
    for k in range(1, self.num_steps):
      step_vars = step_variables(self._built(make_step(k)))
      _check_same_variables(name, variables, step_vars, k)
      for j, v in enumerate(step_vars):
        values[j][k] = np.asarray(v.numpy())
    self._template = _Hidden(template)
    self._template_variables = _Hidden(tuple(variables))
    return StackedWeights(variables, template.layers, values, name=f'{name}_stacked')

  def _built(self, step):
    """The step with every Keras layer built (one inverse pass on zeros if needed)."""
    unbuilt = [l for l in step.layers if not l.built]
    if unbuilt:
      if self.event_shape is None:
        raise ValueError(f'{self.name}: layers {[l.name for l in unbuilt]} build on their first '
                         'call; give Repeated the event_shape of the steps.')
      step.inverse_and_log_det(tf.zeros((1,) + self.event_shape))
    return step

  # -- what the loop holds ------------------------------------------------------------------
  @property
  def template(self):
    """The step whose ops the loop runs (its own variables are not the model's)."""
    return self._template.value

  @property
  def template_variables(self):
    return list(self._template_variables.value)

  # -- forward / inverse --------------------------------------------------------------------
  def _forward_and_log_det(self, x, **condition):
    return self._run(x, condition, inverse=False)

  def _inverse_and_log_det(self, y, **condition):
    return self._run(y, condition, inverse=True)

  @tf.autograph.experimental.do_not_convert   # Python builds the loop; autograph must not
  def _run(self, x, condition, inverse):
    def one_step(step, carry, kwargs):
      h, total = carry
      fn = step.inverse_and_log_det if inverse else step.forward_and_log_det
      h, ldj = fn(h, **kwargs, **condition)
      return h, total + ldj

    zero = tf.zeros(tf.shape(x)[:-base.EVENT_NDIMS], x.dtype)
    return self.scan(one_step, (x, zero), reverse=inverse)

  @tf.autograph.experimental.do_not_convert
  def scan(self, fn, carry, reverse=False):
    """Runs carry = fn(step_k, carry, kwargs_k) for k = 0 .. K-1 (K-1 .. 0 with reverse) and
    returns the final carry: the loop of the forward and inverse passes, for any per-step
    computation (the LCMA analysis carries a per-dimension log-det map through it).

    fn(step, carry, kwargs): step is the template with theta_k, kwargs the k-th
    ``step_kwargs``; carry a structure of tensors whose shapes fn keeps. With ``remat`` the
    loop recomputes each step in the backward pass.
    """
    return _StepLoop(self, fn, reverse).run(carry)

  # -- shapes (steps keep the shape) ---------------------------------------------------------
  def _forward_event_shape(self, s):
    return self.template.forward_event_shape(s)

  def _inverse_event_shape(self, s):
    return self.template.inverse_event_shape(s)

  def _forward_event_shape_tensor(self, s):
    return self.template.forward_event_shape_tensor(s)

  def _inverse_event_shape_tensor(self, s):
    return self.template.inverse_event_shape_tensor(s)


class _Packing:
  """Tensors of given shapes and dtypes as one vector per dtype, and back.

  The plain loop reads the K steps' parameters, and writes the carried state, as one
  [K, N_d] array per dtype d (the concatenation of the flattened tensors) instead of one
  array per variable: every array a loop reads or writes is one of its loop variables, with
  its own reads, writes and gradient in every iteration.
  ``pack``/``unpack`` work on [K, ...] tensors and [K, N] arrays (lead=(K,)), or on one
  step's slices and rows (lead=()).
  """

  def __init__(self, variables):
    self.shapes = [tuple(v.shape) for v in variables]
    self.groups = {}
    for j, v in enumerate(variables):
      self.groups.setdefault(tf.as_dtype(v.dtype), []).append(j)

  def pack(self, tensors, lead):
    """{dtype: [*lead, N]} from the list of tensors [*lead, *shape_j]."""
    return {dtype: tf.concat([tf.reshape(tf.cast(tensors[j], dtype), list(lead) + [-1])
                              for j in members], axis=-1)
            for dtype, members in self.groups.items()}

  def unpack(self, packed, lead):
    """The list of tensors [*lead, *shape_j] from {dtype: [*lead, N]}."""
    out = [None] * len(self.shapes)
    for dtype, members in self.groups.items():
      for j, part in zip(members, tf.split(packed[dtype], self._sizes(members), axis=-1)):
        out[j] = tf.reshape(part, list(lead) + list(self.shapes[j]))
    return out

  def arrays(self, num):
    """Empty TensorArrays of K rows, one per dtype, for ``write`` and ``stacked``."""
    return [tf.TensorArray(dtype, size=num, element_shape=[sum(self._sizes(members))])
            for dtype, members in self.groups.items()]

  def _sizes(self, members):
    return [int(np.prod(self.shapes[j], dtype=np.int64)) for j in members]

  def write(self, arrays, k, tensors):
    """The arrays with row k set to the packed tensors of one step."""
    rows = self.pack(tensors, lead=())
    return [a.write(k, rows[dtype]) for a, dtype in zip(arrays, self.groups)]

  def stacked(self, arrays, num):
    """The list of [K, *shape_j] tensors the K-row arrays hold."""
    return self.unpack({dtype: a.stack() for a, dtype in zip(arrays, self.groups)}, lead=(num,))


class _StepLoop:
  """One ``tf.while_loop`` over the steps of a ``Repeated`` (see the module doc)."""

  def __init__(self, repeated, fn, reverse):
    self.r = repeated
    self.fn = fn
    self.reverse = reverse
    self.training = keras_compat.current_training()
    self.initializing = _in_data_initialization()
    self.remat = repeated.remat and not self.initializing
    self.variables = repeated.template_variables
    self.weights = repeated.stacked.ordered
    # Written back after the loop: the state a step may update (all variables while ActNorm
    # initialises from data, which assigns trainable weights too).
    self.carried = [j for j, v in enumerate(self.variables)
                    if self.initializing or not v.trainable]
    self.trainable = [j for j, v in enumerate(self.variables) if v.trainable]
    self.updated = set()

  @tf.autograph.experimental.do_not_convert
  def run(self, carry):
    values = [tf.convert_to_tensor(w) for w in self.weights]
    data = {key: tf.constant(v) for key, v in self.r.step_kwargs.items()}
    flat = tf.nest.flatten(carry)
    loop = self._remat_loop if self.remat else self._loop
    h, updates = loop(carry, flat, values, data)
    for j, update in zip(self.carried, updates):
      if j in self.updated:   # the state the steps changed, written back once for all K
        self.weights[j].assign(update)
    return tf.nest.pack_sequence_as(carry, list(h))

  def _loop(self, carry, flat, values, data):
    """The loop, differentiated by TensorFlow; returns (final flat carry, the stacked new
    values of the carried variables)."""
    num = self.r.num_steps
    packing = _Packing(self.variables)
    carried_packing = _Packing([self.variables[j] for j in self.carried])
    # TensorArrays, not gathers: the gradient of a gather from a loop-invariant tensor is a dense
    # [K, N] tensor added up every iteration (K^2 work without XLA); a TensorArray read's is
    # written to slot k of the gradient's TensorArray.
    arrays = {dtype: tf.TensorArray(dtype, size=num, element_shape=m.shape[1:]).unstack(m)
              for dtype, m in packing.pack(values, lead=(num,)).items()}
    outs = carried_packing.arrays(num)

    def body(i, *state):
      k = self._order(i)
      h, outs = list(state[:len(flat)]), list(state[len(flat):])
      theta = packing.unpack({dtype: a.read(k) for dtype, a in arrays.items()}, lead=())
      kwargs = {key: tf.gather(v, k) for key, v in data.items()}
      h, new = self._apply(h, theta, kwargs, structure=carry)
      return (i + 1, *h, *carried_packing.write(outs, k, new))

    result = tf.while_loop(lambda i, *_: i < num, body, (tf.constant(0), *flat, *outs),
                           maximum_iterations=num)
    return result[1:1 + len(flat)], carried_packing.stacked(result[1 + len(flat):], num)

  def _order(self, i):
    """The step the i-th iteration runs."""
    return self.r.num_steps - 1 - i if self.reverse else i

  def _remat_loop(self, carry, flat, values, data):
    """The loop with its own gradient: the forward loop keeps only each step's input carry;
    the backward loop runs the steps in reverse order, recomputing each step from its input
    and theta_k under a tape and writing d/d theta_k to slot k of the weights' gradients. No
    activation of a step outlives its iteration, and the graph holds the forward step once and
    the recomputation with its gradient once (no accumulators of intermediates)."""
    num, n = self.r.num_steps, len(flat)

    def step_inputs(stacked, k):
      # Gathers from each stacked weight, not TensorArrays or the packed arrays of the plain
      # loop: no gradient flows through these reads (the backward loop differentiates with
      # respect to the slices), and a gather copies one step's weights where a TensorArray or
      # packing would copy all K.
      theta = [tf.gather(w, k) for w in stacked]
      return theta, {key: tf.gather(v, k) for key, v in data.items()}

    @tf.custom_gradient
    def loop(*args):
      stacked = list(values)
      for j, value in zip(self.trainable, args[n:]):
        stacked[j] = value
      # Read by every call of grad (a persistent tape or a Jacobian calls it more than once).
      inputs = [tf.TensorArray(h.dtype, size=num, element_shape=h.shape, clear_after_read=False)
                for h in flat]
      outs = [tf.TensorArray(values[j].dtype, size=num, element_shape=values[j].shape[1:])
              for j in self.carried]

      def body(i, *state):
        k = self._order(i)
        h, ins, outs = state[:n], state[n:2 * n], state[2 * n:]
        ins = [a.write(k, x) for a, x in zip(ins, h)]
        theta, kwargs = step_inputs(stacked, k)
        h, new = self._apply(list(h), theta, kwargs, structure=carry)
        outs = [o.write(k, tf.cast(v, o.dtype)) for o, v in zip(outs, new)]
        return (i + 1, *h, *ins, *outs)

      result = tf.while_loop(lambda i, *_: i < num, body,
                             (tf.constant(0), *args[:n], *inputs, *outs),
                             maximum_iterations=num)
      h = list(result[1:1 + n])
      saved = list(result[1 + n:1 + 2 * n])   # each step's input carry, read in the backward
      updates = [o.stack() for o in result[1 + 2 * n:]]

      def grad(*upstream):
        dh = [tf.zeros_like(x) if u is None else u for x, u in zip(h, upstream[:n])]
        grads = [tf.TensorArray(stacked[j].dtype, size=num, element_shape=stacked[j].shape[1:])
                 for j in self.trainable]

        def back(i, *state):
          k = self._order(num - 1 - i)
          dh, grads = list(state[:n]), list(state[n:])
          h_k = [a.read(k) for a in saved]
          theta, kwargs = step_inputs(stacked, k)
          t = [theta[j] for j in self.trainable]
          with tf.GradientTape() as tape:
            tape.watch(h_k + t)
            out, _ = self._apply(h_k, theta, kwargs, structure=carry)
          g = tape.gradient(out, h_k + t, output_gradients=dh,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
          grads = [a.write(k, tf.cast(d, a.dtype)) for a, d in zip(grads, g[n:])]
          return (i + 1, *g[:n], *grads)

        result = tf.while_loop(lambda i, *_: i < num, back, (tf.constant(0), *dh, *grads),
                               maximum_iterations=num)
        return list(result[1:1 + n]) + [a.stack() for a in result[1 + n:]]

      return (*h, *updates), grad

    result = loop(*flat, *[values[j] for j in self.trainable])
    return result[:n], result[n:]

  # -- one step -----------------------------------------------------------------------------
  def _apply(self, h, theta, kwargs, structure):
    """fn on the template with theta mapped onto its variables; returns (flat carry, new
    values of the carried variables)."""
    mapping = list(zip(self.variables, theta))
    with keras_compat.training_scope(self.training), keras.StatelessScope(mapping) as scope:
      before = [scope.get_current_value(self.variables[j]) for j in self.carried]
      out = self.fn(self.r.template, tf.nest.pack_sequence_as(structure, list(h)), kwargs)
      new = []
      for j, old in zip(self.carried, before):
        value = scope.get_current_value(self.variables[j])
        if value is not old:
          self.updated.add(j)
        new.append(value)
    return tf.nest.flatten(out), new


def _np_dtype(v):
  return np.dtype(tf.as_dtype(v.dtype).as_numpy_dtype)


def _check_same_variables(name, reference, variables, k):
  if len(variables) != len(reference) or any(
      tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype or a.trainable != b.trainable
      for a, b in zip(reference, variables)):
    raise ValueError(f'{name}: step {k} does not have the variables of step 0 '
                     f'({len(variables)} vs {len(reference)} variables, or different shapes): '
                     'only identical steps can run as one loop.')


def find_repeated(bijector):
  """Every ``Repeated`` inside a bijector tree (Chains, multi-scale levels, dense blocks)."""
  found, seen = [], set()

  def walk(b):
    if id(b) in seen:
      return
    seen.add(id(b))
    if isinstance(b, Repeated):
      found.append(b)
      return
    for attr in ('bijectors', 'units'):
      for child in getattr(b, attr, None) or ():
        walk(child)
    for level in getattr(b, 'levels', None) or ():
      walk(getattr(level, 'transform', level))

  walk(bijector)
  return found


def has_while_loops(model):
  """Whether ``model`` (a Keras model or layer) holds repeated steps, which run as a
  ``tf.while_loop``."""
  layers = model._flatten_layers(include_self=False)  # pylint: disable=protected-access
  return any(isinstance(layer, StackedWeights) for layer in layers)
