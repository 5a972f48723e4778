"""Equivalence check, tfflows side: does tfflows' DenseFlow compute exactly the official one?

``equivalence_official.py`` (torch) writes the official model's weights, the inputs (8 digits,
dequantization noise u, cross-unit noise e) and its results: per-image log p, the gradient of
the mean bits/dim for every parameter, in training mode (batch statistics) and eval mode
(running statistics), in float32 and float64, plus intermediate activations. This program
builds ``tfflows.build_model`` for the same architecture (configs/mnist.flags: block_conf 2,2,1,
layers_conf 2,2,2, width 32, growth 4, 3 x 32 dense layers, 4 landmarks, 6 pinv iterations,
N(0, I) splits, learned diagonal top prior, float32 networks, attention='official', uniform
dequantization), assigns it the official weights, feeds it the same u and e, and compares:

  * log p per image (nats): FlowModel's own training objective, ``model(images, training=...)``
    = log_weight = log p_prior(z) + log|det| - log q(u|x) - log N(e; 0, I), with tfflows'
    random draws (``tfflows.random.uniform`` / ``normal``) monkeypatched to return u and e;
  * d mean(bits/dim) / d theta for every trainable variable (tf.GradientTape; the stacked
    [K, ...] weights of a unit's steps compared slice by slice), mapped onto the official
    parameters and reported per parameter group: max |difference| and that relative to the
    largest |gradient| of the group;
  * intermediate activations (dense blocks, units, transitions, every coupling network's shift
    and log-scale, every cross-unit (mu, log sigma)), to localise a difference;
  * the batch-norm running statistics after one training-mode pass, and log p / gradients in
    eval mode after that pass (mode eval_after_train: each side's running statistics moved by
    its own rule; reported, not part of the exit status);
  * ActNorm's data-dependent initialisation (float32): both sides initialise from the same
    pre-initialisation state on the same digits and noise, and the resulting ActNorm
    parameters are compared.

Other tfflows layouts of the same model can be checked with --config, e.g.
--config="layers_conf=(3,3,3);remat='step'" (the steps as a tf.while_loop with recomputation)
against an official run with --official_flags='--layers_conf=3,3,3'.

Weight mapping (official -> tfflows; every one is a signed permutation, so the official gradient
mapped the same way is the tfflows gradient):
  conv weight [out, in, kh, kw]          -> Keras kernel [kh, kw, in, out]
  Conv1x1 weight W (F.conv2d: y = W x)    -> kernel W (tfflows: y = W x per pixel, too)
  ActNorm z = (x - shift) e^{-log_scale}  -> y = (x + loc) e^{log_scale}: loc = -shift,
                                             log_scale = -log_scale
  coupling net output: official ElementwiseParams2d(2, 'sequential') reads channel 2i as the
    unconstrained scale and 2i + 1 as the shift of dimension i; tfflows splits shift first, then
    raw: conv_out rows permuted [1, 3, 5, ..., 0, 2, 4, ...]
  MultiHeadDenseBlock concatenates (attention, dense); tfflows (dense, attention): batch-norm
    channels and conv_mid input channels rolled by the width
  gated conv (a, b, c), qkv, cross-unit net (mu, log-scale): the same order on both sides
  top prior loc / log_scale [1, C, 1, 1]  -> [C]
  ActNorm ``initialized`` flags set to 1 (tfflows does not initialise outside
  ``data_initialization()`` anyway)

    /work/official/venv/bin/python benchmarks/denseflow_official/equivalence_official.py \\
        --official_repo=/work/official/denseflow --out=/tmp/denseflow_equiv.npz
    .venv/bin/python benchmarks/denseflow_official/equivalence_tfflows.py \\
        --official_npz=/tmp/denseflow_equiv.npz

Exit status 0 when every comparison of modes train and eval is within --rtol (default 1e-4 in
float32, 1e-9 in float64, relative to the scale of the compared quantity), 1 otherwise. The
forward pass runs eagerly (the recorder reads intermediates as numpy arrays).
"""

import argparse
import ast
import collections
import contextlib
import math
import os
import re
import sys

for _var in ('TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS', 'OMP_NUM_THREADS'):
  os.environ.setdefault(_var, '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

import tfflows  # noqa: E402  pylint: disable=wrong-import-position
from bijectors import actnorm, cross_unit, repeated  # noqa: E402  pylint: disable=wrong-import-position
from tfflows import random as tf_random  # noqa: E402  pylint: disable=wrong-import-position

CONFIG = dict(model='denseflow', image_shape=(32, 32, 1), block_conf=(2, 2, 1),
              layers_conf=(2, 2, 2), layer_mid_channels=(32, 32, 32), growth_rate=4,
              dense_layers=3, dense_growth=32, num_landmarks=4, pinv_iterations=6,
              split_prior='standard', conditioner_precision='float32',
              dequantization='uniform', attention='official')
DEFAULT_RTOL = {'float32': 1e-4, 'float64': 1e-9}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_npz', required=True, help='written by equivalence_official.py')
  p.add_argument('--dtypes', default='float32,float64')
  p.add_argument('--modes', default='train,eval,eval_after_train')
  p.add_argument('--rtol', type=float, default=None,
                 help='relative tolerance (default: 1e-4 float32, 1e-9 float64)')
  p.add_argument('--per_parameter', action='store_true',
                 help='also print every parameter (official name) with its differences')
  p.add_argument('--config', default='',
                 help="FlowConfig overrides separated by ';', values as Python literals, e.g. "
                      "\"layers_conf=(3,3,3);remat='step'\" (with the matching "
                      "--official_flags on the official side)")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- the model
def build(dtype, overrides=()):
  """tfflows' DenseFlow for CONFIG under a global Keras policy of ``dtype``."""
  config = dict(CONFIG)
  config.update(overrides)
  keras.config.set_dtype_policy(dtype)
  try:
    return tfflows.build_model(tfflows.FlowConfig(**config))
  finally:
    keras.config.set_dtype_policy('float32')


# ----------------------------------------------------------------------------- the mapping
def _same(a):
  return a


def _conv(w):
  """torch [out, in, kh, kw] -> Keras [kh, kw, in, out]."""
  return np.transpose(w, (2, 3, 1, 0))


def _negated_vector(a):
  return -a.reshape(-1)


def _vector(a):
  return a.reshape(-1)


def _concat_roll(a):
  """Official (attention, dense) channel order -> tfflows (dense, attention): channel j of
  tfflows is official channel (j + w) mod 2w."""
  w = a.shape[0] // 2
  return np.concatenate([a[w:], a[:w]], 0)


def _conv_mid(w):
  half = w.shape[1] // 2
  return _conv(np.concatenate([w[:, half:], w[:, :half]], 1))


def _params_order(a):
  """Official output channels (scale_0, shift_0, scale_1, shift_1, ...) -> tfflows
  (shift_0, ..., shift_{n-1}, raw_0, ..., raw_{n-1}) (rows of a conv weight or a bias)."""
  n = a.shape[0] // 2
  return np.concatenate([a[1::2], a[0::2]], 0)[:2 * n]


def _conv_out(w):
  return _conv(_params_order(w))


def step_links(dense_layers):
  """{tfflows template key: (official suffix, value map)} for one step ActNorm -> Conv1x1 ->
  coupling (-> swap), official suffixes relative to '...blocks.<u>.transforms.<k>.'."""
  cn = 'transforms.2.coupling_net.0.dn.transform.'
  links = {
      'actnorm/loc': ('transforms.0.shift', _negated_vector),
      'actnorm/log_scale': ('transforms.0.log_scale', _negated_vector),
      'conv1x1/kernel': ('transforms.1.weight', _same),
      'net/conv_in/kernel': (cn + '0.weight', _conv),
      'net/conv_in/bias': (cn + '0.bias', _same),
      'net/gated_conv/conv/kernel': (cn + f'1.dense.{dense_layers}.conv.weight', _conv),
      'net/gated_conv/conv/bias': (cn + f'1.dense.{dense_layers}.conv.bias', _same),
      'net/attention/qkv/kernel': (cn + '1.mha.qkv.weight', _conv),
      'net/attention/qkv/bias': (cn + '1.mha.qkv.bias', _same),
      'net/attention/out/kernel': (cn + '1.mha.out_transform.weight', _conv),
      'net/attention/out/bias': (cn + '1.mha.out_transform.bias', _same),
      'net/batch_norm/gamma': (cn + '1.mix_conv.0.weight', _concat_roll),
      'net/batch_norm/beta': (cn + '1.mix_conv.0.bias', _concat_roll),
      'net/batch_norm/moving_mean': (cn + '1.mix_conv.0.running_mean', _concat_roll),
      'net/batch_norm/moving_variance': (cn + '1.mix_conv.0.running_var', _concat_roll),
      'net/conv_mid/kernel': (cn + '1.mix_conv.2.weight', _conv_mid),
      'net/conv_out/kernel': (cn + '2.weight', _conv_out),
      'net/conv_out/bias': (cn + '2.bias', _params_order),
  }
  for i in range(dense_layers):
    for tf_conv, torch_index in ((f'conv1x1_{i}', 0), (f'conv3x3_{i}', 2)):
      links[f'net/dense_block/{tf_conv}/kernel'] = (cn + f'1.dense.{i}.nn.{torch_index}.weight',
                                                   _conv)
      links[f'net/dense_block/{tf_conv}/bias'] = (cn + f'1.dense.{i}.nn.{torch_index}.bias',
                                                 _same)
  return links


Link = collections.namedtuple('Link', 'variable step official fn')


def links(model, dense_layers):
  """Every tfflows variable (or slice ``step`` of a stacked one) with the official parameter or
  buffer it holds and the map from the official layout. ActNorm flags have official=None."""
  result = []
  per_step = step_links(dense_layers)
  for unit in repeated.find_repeated(model.flow):
    b, u = map(int, re.fullmatch(r'block(\d+)_unit(\d+)', unit.name).groups())
    # stacked [K, ...] weights; the template is step 0
    pairs = [(v.path[len(f'{unit.name}_step0_'):], stacked, k, k)
             for v, stacked in zip(unit.template_variables, unit.stacked.ordered)
             for k in range(unit.num_steps)]
    for key, variable, index, k in pairs:
      if key == 'actnorm/initialized':
        result.append(Link(variable, index, None, None))
        continue
      suffix, fn = per_step[key]
      result.append(Link(variable, index, f'transforms.{3 + 2 * b}.blocks.{u}.transforms.{k}.'
                                          + suffix, fn))
  for v in model.variables:
    m = re.fullmatch(r'block(\d+)_cross(\d+)/(conv3x3|conv_out)/(kernel|bias)', v.path)
    if m:
      b, i, conv, kind = m.groups()
      name = (f'transforms.{3 + 2 * int(b)}.noise_params.{int(i) - 1}.transformation.'
              f'{0 if conv == "conv3x3" else 2}.{"weight" if kind == "kernel" else "bias"}')
      result.append(Link(v, None, name, _conv if kind == 'kernel' else _same))
    elif v.path in ('prior_top/loc', 'prior_top/log_scale'):
      result.append(Link(v, None, 'base_dist.' + v.path.split('/')[1], _vector))
  return result


def assign(model, link_list, official, initialized=1.):
  """Gives the tfflows model the official weights (and running statistics); every ActNorm's
  ``initialized`` flag gets ``initialized``."""
  del model
  values = {}
  for link in link_list:
    if link.official is None:
      value = np.full(link.variable.shape[1:], initialized)
    else:
      value = link.fn(official[link.official])
    target = link.variable.shape if link.step is None else link.variable.shape[1:]
    assert tuple(value.shape) == tuple(target), (link.official, value.shape, target)
    if link.step is None:
      link.variable.assign(value.astype(link.variable.dtype))
    else:
      values.setdefault(id(link.variable), (link.variable, {}))[1][link.step] = value
  for variable, slices in values.values():
    stacked = np.stack([slices[k] for k in range(variable.shape[0])])
    variable.assign(stacked.astype(variable.dtype))


def check_coverage(model, link_list, official_names):
  """Every trainable tfflows weight (each slice) and every official parameter used once."""
  covered = collections.Counter((id(l.variable), l.step) for l in link_list)
  assert all(c == 1 for c in covered.values()), 'a tfflows weight is mapped twice'
  for v in model.trainable_variables:
    steps = [None] if not re.search(r'_stacked/', v.path) else range(v.shape[0])
    for k in steps:
      assert (id(v), k) in covered, f'tfflows weight {v.path}[{k}] has no official parameter'
  used = collections.Counter(l.official for l in link_list if l.official is not None)
  missing = [n for n in official_names if used[n] != 1]
  assert not missing, f'official parameters not mapped exactly once: {missing}'


# ----------------------------------------------------------------------------- running
@contextlib.contextmanager
def fixed_noise(u, noise):
  """tfflows.random.uniform returns u (the dequantizer's one draw); tfflows.random.normal
  returns the cross-unit noise tensors in order (FlowModel._augmentation_noise)."""
  original = tf_random.uniform, tf_random.normal
  queue = list(noise)

  def uniform(shape, seed=None, dtype=None):
    del seed
    assert tuple(np.asarray(shape)) == u.shape, (shape, u.shape)
    return tf.constant(u, dtype)

  def normal(shape, seed=None, dtype=None):
    del seed
    e = queue.pop(0)
    assert tuple(np.asarray(shape)) == e.shape, (shape, e.shape)
    return tf.constant(e, dtype)

  tf_random.uniform, tf_random.normal = uniform, normal
  try:
    yield
  finally:
    tf_random.uniform, tf_random.normal = original
  assert not queue, f'{len(queue)} noise tensors were not used'


def _nchw(t):
  t = np.asarray(t)
  return np.transpose(t, (0, 3, 1, 2)) if t.ndim == 4 else t


class Recorder:
  """Records tfflows intermediates under the official recorder's tags (official layouts) by
  wrapping bound methods of the model's bijectors for one eager pass."""

  def __init__(self, model):
    self.acts, self._undo = {}, []
    for b, level in enumerate(model.flow.levels):
      t = 3 + 2 * b
      for bij in level.transform.bijectors:
        if isinstance(bij, cross_unit.CrossUnitBlock):
          self._block(bij, t)
      if level.keep_channels is not None:
        self._level(level, t + 1)

  def _wrap(self, obj, method, record):
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
      out = original(*args, **kwargs)
      record(out)
      return out
    object.__setattr__(obj, method, wrapped)
    self._undo.append((obj, method))

  def _put(self, tag, value):
    self.acts[tag] = _nchw(np.asarray(value))

  def _block(self, block, t):
    def block_out(out):
      self._put(f't{t}_block/0', out[0])
      self._put(f't{t}_block/1_without_noise_terms', out[1])
    self._wrap(block, 'forward_and_log_det', block_out)
    for u, unit in enumerate(block.units):
      def unit_out(out, u=u):
        self._put(f't{t}_block/unit{u}/0', out[0])
        self._put(f't{t}_block/unit{u}/1', out[1])
      self._wrap(unit, 'forward_and_log_det', unit_out)
      # the couplings in call order: the template's K calls
      calls = []
      def params_out(out, u=u, calls=calls):
        shift, log_scale = out
        tag = f't{t}_block/unit{u}/step{len(calls)}/coupling'
        calls.append(tag)
        self._put(tag + '_shift', shift)
        self._put(tag + '_log_scale', log_scale)
      self._wrap(unit.template.bijectors[2], '_shift_and_log_scale', params_out)
    counter = []

    def noise_params(out):
      counter.append(None)
      self._put(f't{t}_block/cross{len(counter)}/0', out[0])
      self._put(f't{t}_block/cross{len(counter)}/1', out[1])
    self._wrap(block, '_noise_params', noise_params)

  def _level(self, level, t):
    keep = level.keep_channels

    def level_out(out):
      h = np.asarray(out[0])
      self._put(f't{t}_transition/0', h[..., :keep])
      z = h[..., keep:].astype(np.float64)
      self._put(f't{t}_transition/1', np.sum(-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi),
                                             axis=(1, 2, 3)))
    self._wrap(level.transform, 'forward_and_log_det', level_out)

  def close(self):
    for obj, method in self._undo:
      object.__delattr__(obj, method)


def run(model, images, u, noise, training):
  """(log w [B], {id(variable): gradient of mean bits/dim}, activations, BN moving stats)."""
  recorder = Recorder(model)
  try:
    with tf.GradientTape() as tape:
      with fixed_noise(u, noise):
        log_w = model(tf.constant(images, model.flow_dtype), training=training)
      bpd = tf.reduce_mean(-log_w / (model.num_dims * math.log(2.)))
  finally:
    recorder.close()
  grads = tape.gradient(bpd, model.trainable_variables)
  grads = {id(v): (np.zeros(v.shape) if g is None else np.asarray(g))
           for v, g in zip(model.trainable_variables, grads)}
  return np.asarray(log_w), grads, recorder.acts


# ----------------------------------------------------------------------------- comparing
def group_of(name):
  """The parameter group of an official parameter name."""
  if name.startswith('base_dist.'):
    return 'top prior (loc, log_scale)'
  if '.noise_params.' in name:
    return 'cross-unit nets g_i (conv3x3, conv1x1)'
  patterns = (('.transforms.0.shift', 'ActNorm shift'), ('.transforms.0.log_scale',
                                                         'ActNorm log_scale'),
              ('.transforms.1.weight', 'Conv1x1 W'), ('dn.transform.0.', 'coupling conv_in'),
              ('.nn.0.', 'dense layers conv1x1'), ('.nn.2.', 'dense layers conv3x3'),
              ('.conv.', 'gated conv'), ('mha.qkv', 'attention qkv'),
              ('mha.out_transform', 'attention out'), ('mix_conv.0', 'batch norm gamma, beta'),
              ('mix_conv.2', 'conv_mid'), ('dn.transform.2.', 'conv_out (zero-init)'))
  for pattern, group in patterns:
    if pattern in name:
      return group
  return 'other'


def compare_gradients(link_list, grads, official, prefix, per_parameter=False):
  """Per group: (elements, max |official grad|, max |difference|); prints the table."""
  groups = collections.OrderedDict()
  rows = []
  for link in link_list:
    if link.official is None or not link.variable.trainable:
      continue
    g_tf = grads[id(link.variable)]
    g_tf = g_tf if link.step is None else g_tf[link.step]
    g_off = link.fn(official[f'{prefix}/grad/{link.official}'])
    diff = float(np.max(np.abs(g_tf - g_off)))
    scale = float(np.max(np.abs(g_off)))
    rows.append((link.official, g_off.size, scale, diff))
    n, s, d = groups.get(group_of(link.official), (0, 0., 0.))
    groups[group_of(link.official)] = (n + g_off.size, max(s, scale), max(d, diff))
  print(f'  {"parameter group":40s} {"elements":>9s} {"max|grad|":>11s} {"max|diff|":>11s} '
        f'{"rel":>9s}')
  for group, (n, s, d) in sorted(groups.items()):
    print(f'  {group:40s} {n:9d} {s:11.4e} {d:11.4e} {d / s if s else 0.:9.2e}')
  # Parameters whose gradient vanishes identically (in training mode: the biases of the
  # attention's output conv and of the gated conv's 'a' part, which batch norm's batch mean
  # removes) hold only rounding noise on both sides: judged against the overall scale.
  largest = max(r[2] for r in rows)
  zero = [r for r in rows if r[2] < 1e-6 * largest]
  live = [r for r in rows if r[2] >= 1e-6 * largest]
  worst = max(live, key=lambda r: r[3] / r[2])
  print(f'  worst parameter (relative to its own max|grad|): {worst[0]}  max|grad| '
        f'{worst[2]:.4e}  max|diff| {worst[3]:.4e}  rel {worst[3] / worst[2]:.2e}')
  if zero:
    print(f'  {len(zero)} parameters with max|grad| < 1e-6 x the largest ({largest:.3e}), judged '
          f'in their group only (e.g. {zero[0][0]}): max|grad| {max(r[2] for r in zero):.2e}, '
          f'max|diff| {max(r[3] for r in zero):.2e}')
  if per_parameter:
    for name, n, s, d in rows:
      print(f'    {name:95s} {n:7d} {s:11.4e} {d:11.4e} {d / s if s else 0.:9.2e}')
  return groups


def compare_activations(acts_tf, official, prefix, noise):
  """Max |difference| (and relative to max |official|) of every recorded intermediate, in the
  order the official flow computes them."""
  worst = 0.
  print(f'  {"intermediate":48s} {"max|official|":>13s} {"max|diff|":>11s} {"rel":>9s}')
  for key in sorted(k for k in official if k.startswith(prefix + '/act/')):
    tag = key[len(prefix + '/act/'):]
    ref = official[key]
    if tag.endswith('coupling_params'):   # [B, C, H, W, 2]: (unconstrained scale, shift)
      base = tag[:-len('coupling_params')] + 'coupling'
      pairs = [('_shift', ref[..., 1]), ('_log_scale', 2. * np.tanh(ref[..., 0] / 2.))]
      items = [(base + s, r, acts_tf.get(base + s)) for s, r in pairs]
    elif re.fullmatch(r't\d+_block/1', tag):
      # The official block log-det includes -log N(e; 0, I) of its noise; tfflows subtracts it
      # in FlowModel. Add it back from the noise the block consumed.
      mine = acts_tf.get(tag[:-1] + '1_without_noise_terms')
      if mine is not None:
        t = int(tag[1:tag.index('_')])
        for e in noise.get(t, []):
          mine = mine - np.sum(-0.5 * e.astype(np.float64) ** 2 - 0.5 * math.log(2 * math.pi),
                               axis=(1, 2, 3))
      items = [(tag, ref, mine)]
    else:
      items = [(tag, ref, acts_tf.get(tag))]
    for name, r, mine in items:
      if mine is None:
        print(f'  {name:48s} (not recorded on the tfflows side)')
        continue
      d = float(np.max(np.abs(np.asarray(mine, np.float64) - r)))
      s = float(np.max(np.abs(r)))
      worst = max(worst, d / s if s else d)
      print(f'  {name:48s} {s:13.4e} {d:11.4e} {d / s if s else 0.:9.2e}')
  return worst


def compare_running_statistics(link_list, official, state, prefix, batch):
  """Batch-norm moving statistics after one training-mode pass from the same values. Each
  side updates new = 0.9 old + 0.1 batch_statistic; the batch statistic each used is recovered
  as (new - 0.9 old) / 0.1 and compared per layer (n = B H W values per channel)."""
  print('  batch-norm running statistics after the training-mode pass:')
  for stat, key in (('moving_mean', 'running_mean'), ('moving_variance', 'running_var')):
    diffs, lines = [], collections.OrderedDict()
    for link in link_list:
      if link.official and link.official.endswith(key):
        mine = np.asarray(link.variable)[link.step].astype(np.float64)
        theirs = link.fn(official[f'{prefix}/bn_after/{link.official}'])
        start = link.fn(state[link.official])
        diffs.append(np.max(np.abs(mine - theirs)))
        ratio = np.median((theirs - 0.9 * start) / (mine - 0.9 * start))
        block = int(link.official.split('.')[1])
        n = batch * (16 * 16, 8 * 8, 4 * 4)[(block - 3) // 2]
        lines.setdefault(n, []).append(ratio)
    print(f'    {stat}: max |tfflows - official| {max(diffs):.4e}')
    for n, ratios in lines.items():
      print(f'      n = {n:5d}: official / tfflows batch statistic, median over channels: '
            f'{np.min(ratios):.6f} .. {np.max(ratios):.6f}   (n / (n - 1) = {n / (n - 1):.6f})')


def compare_initialization(model, link_list, official, images):
  """ActNorm's data-dependent initialisation on both sides from the same state and noise:
  official log_scale = log(std_unbiased + 1e-6), tfflows log_scale = -log(std_biased)."""
  pre = {k.split('/', 1)[1]: v for k, v in official.items() if k.startswith('pre_init/')}
  assign(model, link_list, pre, initialized=0.)
  init_noise = [official[f'init_noise/{i}'].astype(np.float32)
                for i in range(sum(k.startswith('init_noise/') for k in official))]
  with fixed_noise(official['init_u'].astype(np.float32), init_noise):
    unscaled = model.initialize(images)
  print('\n=== ActNorm data-dependent initialisation (float32, same state and noise) ===')
  print(f'  tfflows channels left unscaled (std < {actnorm.MIN_STD}): {unscaled}')
  print(f'  {"ActNorm (official name)":52s} {"n":>5s} {"max|d loc|":>11s} '
        f'{"mean d log_scale":>16s} {"-0.5 log(n/(n-1))":>17s}')
  worst_loc = 0.
  for link in link_list:
    if link.official and link.official.endswith('transforms.0.log_scale'):
      shift_name = link.official[:-len('log_scale')] + 'shift'
      loc_link = next(l for l in link_list if l.official == shift_name)
      block = int(link.official.split('.')[1])
      n = len(images) * (16 * 16, 8 * 8, 4 * 4)[(block - 3) // 2]
      d_loc = np.max(np.abs(np.asarray(loc_link.variable)[loc_link.step]
                            - loc_link.fn(official[f'post_init/{shift_name}'])))
      d_log_scale = (link.fn(official[f'post_init/{link.official}'])
                     - np.asarray(link.variable)[link.step])
      worst_loc = max(worst_loc, d_loc)
      print(f'  {link.official[:-len(".transforms.0.log_scale")]:52s} {n:5d} {d_loc:11.3e} '
            f'{np.mean(d_log_scale):16.4e} {-0.5 * math.log(n / (n - 1)):17.4e}')
  print('  (d = official mapped to tfflows - tfflows; loc = -shift, log_scale = -log_scale)')


def main(argv=None):
  args = parse_args(argv)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  overrides = {k.strip(): ast.literal_eval(v) for k, v in
               (kv.split('=', 1) for kv in args.config.split(';') if kv.strip())}
  config = dict(CONFIG, **overrides)
  official = dict(np.load(args.official_npz))
  images = official['images']
  noise = [official[f'noise/{i}'] for i in range(sum(k.startswith('noise/') for k in official))]
  state = {k.split('/', 1)[1]: v for k, v in official.items()
           if k.startswith('param/') or k.startswith('buffer/')}
  param_names = [k.split('/', 1)[1] for k in official if k.startswith('param/')]
  print(f'{len(images)} digits, perturb={float(official["perturb"])}, '
        f'{sum(state[n].size for n in param_names):,} official parameters')
  # which noise tensors each official dense block consumed (for its log-det)
  block_noise, i = {}, 0
  for b, units in enumerate(config['block_conf']):
    block_noise[3 + 2 * b] = noise[i:i + units - 1]
    i += units - 1

  ok = True
  for dtype in args.dtypes.split(','):
    rtol = args.rtol or DEFAULT_RTOL[dtype]
    model = build(dtype, overrides)
    n_tf = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    link_list = links(model, config['dense_layers'])
    check_coverage(model, link_list, param_names)
    if dtype == 'float32' and 'init_u' in official:
      compare_initialization(model, link_list, official, images)
    for mode in args.modes.split(','):
      prefix = f'{dtype}/{mode}'
      assign(model, link_list, state)   # fresh weights and running statistics for each mode
      print(f'\n=== {prefix} ({n_tf:,} tfflows parameters) ===')
      u = official['u'].astype(dtype)
      e = [x.astype(dtype) for x in noise]
      if mode == 'eval_after_train':
        run(model, images.astype(dtype), u, e, training=True)
      log_w, grads, acts = run(model, images.astype(dtype), u, e, training=(mode == 'train'))
      ref = official[f'{prefix}/logp']
      d = np.abs(log_w - ref)
      print(f'  log p official {np.array2string(ref, precision=3)}')
      print(f'  log p tfflows  {np.array2string(log_w, precision=3)}')
      rel_lp = float(d.max() / np.abs(ref).max())
      print(f'  log p: max |diff| {d.max():.4e} nats, relative {rel_lp:.2e}')
      groups = compare_gradients(link_list, grads, official, prefix, args.per_parameter)
      rel_g = max(dd / s for _, s, dd in groups.values() if s)
      worst_act = compare_activations(acts, official, prefix, block_noise)
      if mode == 'train':
        compare_running_statistics(link_list, official, state, prefix, len(images))
      verdict = rel_lp <= rtol and rel_g <= rtol and worst_act <= rtol
      if mode != 'eval_after_train':    # the exit status: the function and its gradients
        ok &= verdict
      print(f'  => {prefix}: log p rel {rel_lp:.2e}, worst gradient group rel {rel_g:.2e}, '
            f'worst intermediate rel {worst_act:.2e}: '
            f'{"AGREE" if verdict else "DIFFER"} (rtol {rtol:g})')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
