"""Equivalence check, tfflows side: does tfflows' mAR-SCF compute exactly the official one?

``equivalence_official.py`` (torch) writes the official model's weights, the inputs (8 digits
and the dequantization noise u) and its results: per-image log p and the gradient of the mean
bits/dim for every parameter, in float32 and float64, plus intermediate activations. This
program builds ``tfflows.build_model`` for the same architecture (configs/marscf_affine_mnist.flags:
model='marscf', coupling='affine', 3 levels of K = 4 steps, width 32, sigmoid scale, LU 1x1
convolutions, mAR priors with mar_hidden=16 and mar_layers=2, uniform dequantization, 32x32x1
images), assigns it the official weights, feeds it the same u and compares:

  * log p per image (nats): FlowModel's own training objective, ``model(images, training=True)``
    = log_weight = log p_prior(z) + log|det dz/d(x + u)| (ToUnitInterval's -D ln 256 included;
    log q(u|x) = 0), with ``tfflows.random.uniform`` (the dequantizer's one draw)
    monkeypatched to return u;
  * d mean(bits/dim) / d theta for every trainable variable (tf.GradientTape; the stacked
    [K, ...] weights of a level's steps compared slice by slice), mapped onto the official
    parameters and reported per parameter group: max |difference| and that relative to the
    largest |gradient| of the group;
  * intermediate activations (each level's output after its K steps and their log-det, every
    coupling network's shift and log-scale, every prior's per-image log-likelihood and its
    (mean, log sigma) for every channel), to localise a difference;
  * the weights as each side constructs them (independent random draws: per parameter group
    the RMS and largest |value| of each side; reported, not part of the exit status);
  * ActNorm's data-dependent initialisation (reported, not part of the exit status): both
    sides initialise from the same pre-initialisation state on the same digits and noise, and
    the resulting ActNorm parameters (the steps' and the coupling networks') are compared; in
    float32 against the official code as it is (its logs = log(1 / (std + 1e-6)) against
    tfflows' -log(std)), in float64 against the official pass with that eps set to 0.

The one intentional difference: tfflows bounds the prior's log sigma softly,
log sigma = 4 tanh(raw / 4) (``MARPrior._bound``; the official log sigma is the raw head
output). With --bound=identity (the default) this program replaces ``MARPrior._bound`` by the
identity for the check, so the two models should compute the same function;
--bound=tfflows keeps tfflows' bound and shows what it changes at these weights.

Weight mapping (official -> tfflows; every one is a signed permutation or a reshape, so the
official gradient mapped the same way is the tfflows gradient):
  step k of level i: official flow.layers.<j>, j = i (K + 2) + 1 + k (squeeze, K FlowSteps,
    Split2dMsC per level); tfflows level<i>_steps' stacked weights [K, ...], slice k
    (``StackedWeights.stacked(template variable)``)
  ActNorm: official x + bias, then * exp(logs)      -> (x + loc) exp(log_scale): loc = bias,
    log_scale = logs ([1, C, 1, 1] -> [C]); the same for the ActNorm after each hidden conv
    of the coupling network (official Conv2d.actnorm -> GlowConditioner.norm_in / norm_mid)
  LU 1x1 conv W = P L U: official p, l, u, sign_s, log_s -> perm, lower, upper, sign,
    log_abs_s (the same matrices: both apply y = W x per pixel and mask L's diagonal and upper
    part and U's diagonal and lower part)
  conv weight [out, in, kh, kw]               -> Keras kernel [kh, kw, in, out]
  coupling network output (Conv2dZeros, y = (conv + b) exp(3 logs)): official
    split_feature(y, 'cross') reads channel 2j as the shift and 2j + 1 as the unconstrained
    scale of dimension j; tfflows splits halves, shift first: conv3's output rows (kernel,
    bias, logs) permuted [0, 2, 4, ..., 1, 3, 5, ...]
  mAR prior (official prior_list[l - 1] for level l = 1..L; tfflows' priors are top-down):
    z1_cond_network.0 / .2 -> embed's two convs, conv_embed -> input_conv, conv_out1 -> head,
    Conv2dLSTM weight_ih_l<j> [4h, Cin, k, k] / weight_hh_l<j> -> cell_<j> input_kernel /
    recurrent_kernel [k, k, Cin, 4h] (gates i, f, g, o in the same order on both sides),
    bias_ih_l<j> / bias_hh_l<j> -> input_bias / recurrent_bias
  ActNorm ``initialized`` flags set to 1 (tfflows does not initialise outside
    ``data_initialization()`` anyway)
  not mapped: the top prior's z1_cond_network (built by the official code, never called;
    16,036 parameters without gradient)

    /work/official/venv/bin/python benchmarks/marscf_official/equivalence_official.py \\
        --official_repo=/work/official/marscf --out=/tmp/marscf_equiv.npz
    .venv/bin/python benchmarks/marscf_official/equivalence_tfflows.py \\
        --official_npz=/tmp/marscf_equiv.npz

Exit status 0 when log p, every gradient group and every intermediate are within --rtol
(default 1e-4 in float32, 1e-10 in float64, relative to the scale of the compared quantity), 1
otherwise. The forward pass runs eagerly (the recorder reads intermediates as numpy arrays).
"""

import argparse
import ast
import collections
import contextlib
import math
import os
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
from bijectors import actnorm, repeated  # noqa: E402  pylint: disable=wrong-import-position
from tfflows import random as tf_random  # noqa: E402  pylint: disable=wrong-import-position
from tfflows.distributions import mar_prior  # noqa: E402  pylint: disable=wrong-import-position

CONFIG = dict(model='marscf', image_shape=(32, 32, 1), coupling='affine', num_levels=3,
              steps_per_level=4, width=32, scale_fn='sigmoid', conv1x1='lu', mar_hidden=16,
              mar_layers=2, dequantization='uniform')
DEFAULT_RTOL = {'float32': 1e-4, 'float64': 1e-10}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_npz', required=True, help='written by equivalence_official.py')
  p.add_argument('--dtypes', default='float32,float64')
  p.add_argument('--rtol', type=float, default=None,
                 help='relative tolerance (default: 1e-4 float32, 1e-10 float64)')
  p.add_argument('--bound', default='identity', choices=['identity', 'tfflows'],
                 help="the prior's log-sigma bound: identity (the official, unbounded log "
                      "sigma; MARPrior._bound patched for the check) or tfflows' own "
                      '4 tanh(raw / 4)')
  p.add_argument('--per_parameter', action='store_true',
                 help='also print every parameter (official name) with its differences')
  p.add_argument('--config', default='',
                 help="FlowConfig overrides separated by ';', values as Python literals, e.g. "
                      "\"steps_per_level=2;remat='step'\" (with the matching "
                      '--official_flags on the official side for architecture changes)')
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- the model
def build(dtype, overrides=()):
  """tfflows' mAR-SCF for CONFIG under a global Keras policy of ``dtype``."""
  config = dict(CONFIG)
  config.update(overrides)
  keras.config.set_dtype_policy(dtype)
  try:
    return tfflows.build_model(tfflows.FlowConfig(**config))
  finally:
    keras.config.set_dtype_policy('float32')


@contextlib.contextmanager
def prior_bound(kind):
  """--bound=identity: MARPrior's log sigma is the head's raw output, as in the official code."""
  original = mar_prior.MARPrior._bound  # pylint: disable=protected-access
  if kind == 'identity':
    mar_prior.MARPrior._bound = lambda self, raw: raw  # pylint: disable=protected-access
  try:
    yield
  finally:
    mar_prior.MARPrior._bound = original  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- the mapping
def _same(a):
  return a


def _vector(a):
  return a.reshape(-1)


def _conv(w):
  """torch [out, in, kh, kw] -> Keras [kh, kw, in, out]."""
  return np.transpose(w, (2, 3, 1, 0))


def _out_order(a):
  """Official Conv2dZeros output channels (shift_0, scale_0, shift_1, scale_1, ...) ->
  tfflows (shift_0, ..., shift_{n-1}, raw_0, ..., raw_{n-1}) (rows of a weight, a bias or
  logs [C, 1, 1])."""
  if a.ndim == 3:                      # Conv2dZeros.logs [C, 1, 1]
    a = a.reshape(-1)
  return np.concatenate([a[0::2], a[1::2]], 0)


def _conv_out(w):
  return _conv(_out_order(w))


Link = collections.namedtuple('Link', 'variable step official fn')


def step_links(template):
  """[(template variable, official suffix relative to 'flow.layers.<j>.', value map)] for one
  step ActNorm -> LU 1x1 conv -> affine coupling (official FlowStep); suffix None for the
  ActNorm ``initialized`` flags."""
  an = template.bijectors[0].params
  lu = template.bijectors[1].params
  net = template.bijectors[2].conditioner
  nn = 'coupling.NN_net.'
  return [
      (an.loc, 'actnormlayer.bias', _vector),
      (an.log_scale, 'actnormlayer.logs', _vector),
      (an.initialized, None, None),
      (lu.perm, 'invert_1x1_layer.p', _same),
      (lu.lower, 'invert_1x1_layer.l', _same),
      (lu.upper, 'invert_1x1_layer.u', _same),
      (lu.sign, 'invert_1x1_layer.sign_s', _same),
      (lu.log_abs_s, 'invert_1x1_layer.log_s', _same),
      (net.conv_in.kernel, nn + 'conv1.weight', _conv),
      (net.norm_in.loc, nn + 'conv1.actnorm.bias', _vector),
      (net.norm_in.log_scale, nn + 'conv1.actnorm.logs', _vector),
      (net.norm_in.initialized, None, None),
      (net.conv_mid.kernel, nn + 'conv2.weight', _conv),
      (net.norm_mid.loc, nn + 'conv2.actnorm.bias', _vector),
      (net.norm_mid.log_scale, nn + 'conv2.actnorm.logs', _vector),
      (net.norm_mid.initialized, None, None),
      (net.conv_out.kernel, nn + 'conv3.weight', _conv_out),
      (net.conv_out.bias, nn + 'conv3.bias', _out_order),
      (net.conv_out.logs, nn + 'conv3.logs', _out_order),
  ]


def prior_links(prior, index):
  """Links of one MARPrior to the official prior_list[index]."""
  pre = f'flow.c_prior.prior_list.{index}.'
  result = []
  if prior.embed is not None:
    for conv, j in zip(prior.embed.layers, (0, 2)):
      result += [Link(conv.kernel, None, pre + f'z1_cond_network.{j}.weight', _conv),
                 Link(conv.bias, None, pre + f'z1_cond_network.{j}.bias', _same)]
  enc = pre + 'prior_lstm.'
  result += [Link(prior.input_conv.kernel, None, enc + 'conv_embed.weight', _conv),
             Link(prior.input_conv.bias, None, enc + 'conv_embed.bias', _same)]
  for j, cell in enumerate(prior.lstm.cells):
    result += [Link(cell.input_kernel, None, enc + f'lstm.weight_ih_l{j}', _conv),
               Link(cell.recurrent_kernel, None, enc + f'lstm.weight_hh_l{j}', _conv),
               Link(cell.input_bias, None, enc + f'lstm.bias_ih_l{j}', _same),
               Link(cell.recurrent_bias, None, enc + f'lstm.bias_hh_l{j}', _same)]
  result += [Link(prior.head.kernel, None, enc + 'conv_out1.weight', _conv),
             Link(prior.head.bias, None, enc + 'conv_out1.bias', _same)]
  return result


def links(model):
  """Every tfflows variable (or slice ``step`` of a stacked one) with the official parameter or
  buffer it holds and the map from the official layout. ActNorm flags have official=None."""
  result = []
  units = repeated.find_repeated(model.flow)
  assert len(units) == len(model.flow.levels)
  offset = 0
  for i, unit in enumerate(units):
    num = unit.num_steps
    for k in range(num):
      j = offset + 1 + k
      # stacked [K, ...] weights; the template is step 0's graph
      pairs = [(unit.stacked.stacked(v), k, suffix, fn)
               for v, suffix, fn in step_links(unit.template)]
      for variable, index, suffix, fn in pairs:
        result.append(Link(variable, index, None if suffix is None
                           else f'flow.layers.{j}.{suffix}', fn))
    offset += 1 + num + (1 if i < len(units) - 1 else 0)
  num = len(model.priors)
  for k, prior in enumerate(model.priors):   # top-down; official prior_list is bottom-up
    result += prior_links(prior, num - 1 - k)
  return result


def assign(model, link_list, official, initialized=1.):
  """Gives the tfflows model the official weights; every ActNorm's ``initialized`` flag gets
  ``initialized``."""
  del model
  values = {}
  for link in link_list:
    target = link.variable.shape if link.step is None else link.variable.shape[1:]
    if link.official is None:
      value = np.full(target, initialized)
    else:
      value = link.fn(official[link.official])
    assert tuple(value.shape) == tuple(target), (link.official, value.shape, target)
    if link.step is None:
      link.variable.assign(value.astype(link.variable.dtype))
    else:
      values.setdefault(id(link.variable), (link.variable, {}))[1][link.step] = value
  for variable, slices in values.values():
    stacked = np.stack([slices[k] for k in range(variable.shape[0])])
    variable.assign(stacked.astype(variable.dtype))


def check_coverage(model, link_list, official_names, unused):
  """Every tfflows weight (each slice) mapped once; every official parameter the loss reaches
  used once, and none of those it never reaches."""
  covered = collections.Counter((id(l.variable), l.step) for l in link_list)
  assert all(c == 1 for c in covered.values()), 'a tfflows weight is mapped twice'
  stacked = {id(l.variable) for l in link_list if l.step is not None}
  for v in model.variables:
    if 'seed_generator' in v.path:
      continue
    steps = range(v.shape[0]) if id(v) in stacked else [None]
    for k in steps:
      assert (id(v), k) in covered, f'tfflows weight {v.path}[{k}] has no official parameter'
  used = collections.Counter(l.official for l in link_list if l.official is not None)
  missing = [n for n in official_names if used[n] != (0 if n in unused else 1)]
  assert not missing, f'official parameters not mapped as expected: {missing}'


# ----------------------------------------------------------------------------- running
@contextlib.contextmanager
def fixed_noise(u):
  """tfflows.random.uniform returns u (the dequantizer's one draw)."""
  original = tf_random.uniform
  used = []

  def uniform(shape, seed=None, dtype=None):
    del seed
    assert tuple(np.asarray(shape)) == u.shape, (shape, u.shape)
    used.append(None)
    return tf.constant(u, dtype)

  tf_random.uniform = uniform
  try:
    yield
  finally:
    tf_random.uniform = original
  assert len(used) == 1, f'the dequantization noise was drawn {len(used)} times'


def _nchw(t):
  t = np.asarray(t)
  return np.transpose(t, (0, 3, 1, 2)) if t.ndim == 4 else t


class Recorder:
  """Records tfflows intermediates under the official recorder's tags (official layouts) by
  wrapping bound methods of the model's bijectors and priors for one eager pass."""

  def __init__(self, model):
    self.acts, self._undo = {}, []
    for i, unit in enumerate(repeated.find_repeated(model.flow)):
      def level_out(out, i=i):
        self._put(f'level{i}/out', out[0])
        self._put(f'level{i}/logdet', out[1])
      self._wrap(unit, 'forward_and_log_det', level_out)
      # the couplings in call order: the template's K calls
      calls = []
      def params_out(out, i=i, calls=calls):
        shift, log_scale = out
        tag = f'level{i}/step{len(calls)}/coupling'
        calls.append(tag)
        self._put(tag + '_shift', shift)
        self._put(tag + '_log_scale', log_scale)
      self._wrap(unit.template.bijectors[2], '_shift_and_log_scale', params_out)
    num = len(model.priors)
    for k, prior in enumerate(model.priors):
      level = num - k          # the official level of this prior (1 = bottom)

      def log_prob_out(out, level=level):
        self._put(f'prior{level}/log_likelihood', out)

      def params_out(out, level=level):
        self._put(f'prior{level}/mean', out[0])
        self._put(f'prior{level}/log_sigma', out[1])
      self._wrap(prior, 'log_prob', log_prob_out)
      self._wrap(prior, 'conditional_params', params_out)

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

  def close(self):
    for obj, method in self._undo:
      object.__delattr__(obj, method)


def run(model, images, u):
  """(log w [B], {id(variable): gradient of mean bits/dim}, activations), training mode."""
  recorder = Recorder(model)
  try:
    with tf.GradientTape() as tape:
      with fixed_noise(u):
        log_w = model(tf.constant(images, model.flow_dtype), training=True)
      bpd = tf.reduce_mean(-log_w / (model.num_dims * math.log(2.)))
  finally:
    recorder.close()
  grads = tape.gradient(bpd, model.trainable_variables)
  grads = {id(v): (np.zeros(v.shape) if g is None else np.asarray(g))
           for v, g in zip(model.trainable_variables, grads)}
  return np.asarray(log_w), grads, recorder.acts


# ----------------------------------------------------------------------------- comparing
GROUPS = (('z1_cond_network', 'prior embed (z1_cond_network)'),
          ('conv_embed', 'prior input conv (conv_embed)'),
          ('weight_ih', 'prior ConvLSTM weight_ih'), ('weight_hh', 'prior ConvLSTM weight_hh'),
          ('lstm.bias', 'prior ConvLSTM biases (ih, hh)'),
          ('conv_out1', 'prior head (conv_out1)'),
          ('actnormlayer.bias', 'step ActNorm bias'), ('actnormlayer.logs', 'step ActNorm logs'),
          ('invert_1x1_layer.log_s', 'LU 1x1 conv log_s'),   # before '.l'
          ('invert_1x1_layer.l', 'LU 1x1 conv l'), ('invert_1x1_layer.u', 'LU 1x1 conv u'),
          ('conv1.weight', 'coupling conv1 (3x3)'),
          ('conv1.actnorm', 'coupling conv1 ActNorm (bias, logs)'),
          ('conv2.weight', 'coupling conv2 (1x1)'),
          ('conv2.actnorm', 'coupling conv2 ActNorm (bias, logs)'),
          ('conv3.', 'coupling conv3 (zero-init: weight, bias, logs)'))


def group_of(name):
  """The parameter group of an official parameter name (the first pattern it contains)."""
  for pattern, group in GROUPS:
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
  print(f'  {"parameter group":48s} {"elements":>9s} {"max|grad|":>11s} {"max|diff|":>11s} '
        f'{"rel":>9s}')
  for group in [g for _, g in GROUPS if g in groups]:
    n, s, d = groups[group]
    print(f'  {group:48s} {n:9d} {s:11.4e} {d:11.4e} {d / s if s else 0.:9.2e}')
  worst = max(rows, key=lambda r: r[3] / r[2] if r[2] else 0.)
  print(f'  worst parameter (relative to its own max|grad|): {worst[0]}  max|grad| '
        f'{worst[2]:.4e}  max|diff| {worst[3]:.4e}  rel {worst[3] / worst[2]:.2e}')
  if per_parameter:
    for name, n, s, d in rows:
      print(f'    {name:70s} {n:7d} {s:11.4e} {d:11.4e} {d / s if s else 0.:9.2e}')
  return groups


def _log_sigmoid(x):
  return -np.logaddexp(0., -x)


def compare_activations(acts_tf, official, prefix):
  """Max |difference| (and relative to max |official|) of every recorded intermediate, in the
  order the official flow computes them."""
  worst = 0.
  print(f'  {"intermediate":48s} {"max|official|":>13s} {"max|diff|":>11s} {"rel":>9s}')
  for key in sorted(k for k in official if k.startswith(prefix + '/act/')):
    tag = key[len(prefix + '/act/'):]
    ref = official[key]
    if tag.endswith('/nn_out'):          # [B, C, H, W]: (shift, raw scale) interleaved
      base = tag[:-len('nn_out')] + 'coupling'
      raw = ref[:, 1::2].astype(np.float64)
      items = [(base + '_shift', ref[:, 0::2]),
               (base + '_log_scale', _log_sigmoid(raw + 2.))]
    elif tag.endswith('/params'):        # [B, T, 2, H, W]: (mean, log sigma) of channel T
      base = tag[:-len('params')]
      items = [(base + 'mean', ref[:, :, 0]), (base + 'log_sigma', ref[:, :, 1])]
    elif tag.endswith('/logdet_in'):
      continue
    else:
      items = [(tag, ref)]
    for name, r in items:
      mine = acts_tf.get(name)
      if mine is None:
        print(f'  {name:48s} (not recorded on the tfflows side)')
        continue
      d = float(np.max(np.abs(np.asarray(mine, np.float64) - r)))
      s = float(np.max(np.abs(r)))
      mark = ''
      if name.endswith('/logdet'):
        # The official value is a difference of FlowNet's accumulated log-det (which holds
        # -D ln 256 = -5678 nats): judged against the accumulator's size, its rounding scale.
        s = max(s, float(np.max(np.abs(official[key + '_in']))))
        mark = ' *'
      worst = max(worst, d / s if s else d)
      print(f'  {name:48s} {s:13.4e} {d:11.4e} {d / s if s else 0.:9.2e}{mark}')
  print('  (* judged against max |official accumulated log-det| before the level: the official '
        'level log-det is a difference of that accumulator)')
  return worst


def compare_construction(fresh, link_list, official):
  """The weights as each side constructs them (official pre_init/, tfflows' freshly built
  model: independent random draws): per parameter group, the pooled RMS and the largest |value|
  of each side, and their ratios (~1 when both draw from the same distributions)."""
  groups = collections.OrderedDict()
  for link in link_list:
    if link.official is None or not link.variable.trainable:
      continue
    mine = fresh[id(link.variable)]
    mine = (mine if link.step is None else mine[link.step]).astype(np.float64)
    theirs = link.fn(official[f'pre_init/{link.official}']).astype(np.float64)
    if link.official.endswith('invert_1x1_layer.l'):   # only the strictly lower part is used
      mine, theirs = np.tril(mine, -1), np.tril(theirs, -1)
    n, s_tf, s_off, m_tf, m_off = groups.get(group_of(link.official), (0, 0., 0., 0., 0.))
    groups[group_of(link.official)] = (n + theirs.size, s_tf + np.sum(mine ** 2),
                                       s_off + np.sum(theirs ** 2),
                                       max(m_tf, np.max(np.abs(mine))),
                                       max(m_off, np.max(np.abs(theirs))))
  print('\n=== weights as constructed (independent draws; float32) ===')
  print(f'  {"parameter group":48s} {"elements":>9s} {"RMS official":>12s} {"RMS tfflows":>12s} '
        f'{"ratio":>6s} {"max official":>12s} {"max tfflows":>12s} {"ratio":>6s}')
  for group in [g for _, g in GROUPS if g in groups]:
    n, s_tf, s_off, m_tf, m_off = groups[group]
    r_off, r_tf = math.sqrt(s_off / n), math.sqrt(s_tf / n)
    print(f'  {group:48s} {n:9d} {r_off:12.4e} {r_tf:12.4e} '
          f'{r_tf / r_off if r_off else float(r_tf == 0):6.3f} {m_off:12.4e} {m_tf:12.4e} '
          f'{m_tf / m_off if m_off else float(m_tf == 0):6.3f}')


def compare_initialization(model, link_list, official, images, dtype):
  """ActNorm's data-dependent initialisation on both sides from the same state, digits and
  noise. float32: against the official float32 pass (official logs = log(1 / (std + 1e-6)),
  tfflows log_scale = -log(std), or 0 where std < actnorm.MIN_STD; both with the biased std over
  batch and pixels). float64: against the official float64 pass with eps = 0. Returns the
  largest difference."""
  key = 'post_init' if dtype == 'float32' else 'post_init_eps0_float64'
  pre = {k.split('/', 1)[1]: v for k, v in official.items() if k.startswith('pre_init/')}
  assign(model, link_list, pre, initialized=0.)
  with fixed_noise(official['init_u'].astype(dtype)):
    unscaled = model.initialize(images)
  print(f'\n=== ActNorm data-dependent initialisation ({dtype}, same state, digits and noise; '
        f'official {"as it is" if dtype == "float32" else "in float64 with eps = 0"}) ===')
  print(f'  tfflows channels left unscaled (std < {actnorm.MIN_STD}): {unscaled}')
  print(f'  {"ActNorm kind":32s} {"layers":>6s} {"max|d bias|":>12s} {"max|d logs|":>12s} '
        f'{"max|logs|":>10s}')
  rows = collections.OrderedDict()
  for link in link_list:
    if link.official is None or f'{key}/{link.official}' not in official:
      continue
    kind = ('step ActNorm' if 'actnormlayer' in link.official else
            'coupling conv1 ActNorm' if 'conv1.' in link.official else 'coupling conv2 ActNorm')
    mine = np.asarray(link.variable)
    mine = mine if link.step is None else mine[link.step]
    theirs = link.fn(official[f'{key}/{link.official}'])
    n, db, dl, ml = rows.get(kind, (0, 0., 0., 0.))
    d = float(np.max(np.abs(mine - theirs)))
    if link.official.endswith('.bias'):
      rows[kind] = (n + 1, max(db, d), dl, ml)
    else:
      rows[kind] = (n, db, max(dl, d), max(ml, float(np.max(np.abs(theirs)))))
  for kind, (n, db, dl, ml) in rows.items():
    print(f'  {kind:32s} {n:6d} {db:12.3e} {dl:12.3e} {ml:10.3f}')
  if dtype == 'float32':
    print('  (official logs = log(1 / (std + 1e-6)) against tfflows\' -log(std): about 1e-6 / std '
          'per layer, passed on to the layers after it)')
  return max(max(db, dl) for _, db, dl, _ in rows.values())


def main(argv=None):
  args = parse_args(argv)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  overrides = {k.strip(): ast.literal_eval(v) for k, v in
               (kv.split('=', 1) for kv in args.config.split(';') if kv.strip())}
  official = dict(np.load(args.official_npz))
  images = official['images']
  state = {k.split('/', 1)[1]: v for k, v in official.items()
           if k.startswith('param/') or k.startswith('buffer/')}
  param_names = [k.split('/', 1)[1] for k in official if k.startswith('param/')]
  unused = {k.split('/', 1)[1] for k in official if k.startswith('unused/')}
  n_used = sum(state[n].size for n in param_names if n not in unused)
  print(f'{len(images)} digits, perturb={float(official["perturb"])}, '
        f'{n_used:,} official parameters reached by the loss '
        f'(+{sum(state[n].size for n in unused):,} never used: {sorted(unused)}); '
        f"prior log-sigma bound: {args.bound}")

  ok = True
  with prior_bound(args.bound):
    for dtype in args.dtypes.split(','):
      rtol = args.rtol or DEFAULT_RTOL[dtype]
      model = build(dtype, overrides)
      n_tf = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
      link_list = links(model)
      check_coverage(model, link_list, param_names, unused)
      if dtype == 'float32':
        compare_construction({id(v): np.asarray(v) for v in model.variables}, link_list,
                             official)
      if 'init_u' in official:
        compare_initialization(model, link_list, official, images, dtype)
      prefix = dtype
      assign(model, link_list, state)
      print(f'\n=== {prefix} ({n_tf:,} tfflows parameters) ===')
      log_w, grads, acts = run(model, images.astype(dtype), official['u'].astype(dtype))
      ref = official[f'{prefix}/logp']
      d = np.abs(log_w - ref)
      print(f'  log p official {np.array2string(ref, precision=4)}')
      print(f'  log p tfflows  {np.array2string(log_w, precision=4)}')
      rel_lp = float(d.max() / np.abs(ref).max())
      print(f'  log p: max |diff| {d.max():.4e} nats, relative {rel_lp:.2e}')
      groups = compare_gradients(link_list, grads, official, prefix, args.per_parameter)
      rel_g = max(dd / s for _, s, dd in groups.values() if s)
      worst_act = compare_activations(acts, official, prefix)
      verdict = rel_lp <= rtol and rel_g <= rtol and worst_act <= rtol
      ok &= verdict
      print(f'  => {prefix}: log p rel {rel_lp:.2e}, worst gradient group rel {rel_g:.2e}, '
            f'worst intermediate rel {worst_act:.2e}: '
            f'{"AGREE" if verdict else "DIFFER"} (rtol {rtol:g})')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
