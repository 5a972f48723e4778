"""Equivalence check, official side: the official PyTorch mAR-SCF's log-likelihood and gradients
for given weights and given noise, written to an .npz for ``equivalence_tfflows.py``.

The check asks whether tfflows' mAR-SCF (coupling='affine') computes the same function as the
authors' code (github.com/visinf/mar-scf): with IDENTICAL weights and IDENTICAL dequantization
noise u, the per-image log-likelihood and the gradient of the mean bits/dim with respect to
every parameter must agree to rounding. This program (run with a Python that has torch) does
the official half:

  1. builds the official model exactly as ``official_train.py`` does (``build_model``, the
     defaults of its ``parse_args``: configs/marscf_affine_mnist.flags' architecture, 3 levels
     of K = 4 steps, width 32, mAR priors with a 2-layer ConvLSTM of hidden size 16, 32x32x1
     images), torch.manual_seed(seed) and np.random.seed(seed) (the LU 1x1 convolutions'
     random orthogonal initialisation draws from numpy's global generator);
  2. one training-mode forward pass on the first --batch digits of mnist5k.npz's x_train
     data-initialises every ActNorm (the steps' and the two inside every coupling network), as
     the first training step does; it runs on given noise (init_u), and the state before
     (pre_init/<name>) and the ActNorm parameters after it (post_init/<name>) are kept, so that
     tfflows' data-dependent initialisation can be compared as well; the same pass in float64
     with Actnormlayer.eps = 0 (official logs = log(1 / (std + 1e-6)), tfflows' -log(std))
     gives post_init_eps0_float64/<name>;
  3. --perturb > 0 (default 0.1) then adds Gaussian noise to every parameter (sd = perturb x the
     parameter tensor's RMS, or x 1/sqrt(fan_in) / x 1 for the all-zero tensors): at
     initialisation the zero-initialised output conv (Conv2dZeros) makes every coupling the
     identity and every gradient inside the coupling networks but the last conv's exactly
     zero, which would test nothing there;
  4. draws u ~ U[0, 1) [B, 32, 32, 1] with numpy (NHWC, stored as such) and feeds it to the
     model by monkeypatching torch.rand: MarScfFlow.normal_flow's dequantization
     (marscf_main.py, ``z = x + torch.rand(x.size()) * (1. / 256.)``) is the one draw of that
     shape; every other call (ChannelPriorUniScale.dropout_in draws torch.rand(B, C) and, with
     the official dp_rate = 0, drops nothing) goes to the real torch.rand;
  5. for float32 (the official training dtype) and float64 (a fresh model given the same
     weights, to separate rounding from real differences), in training mode: log p per image
     in nats (the ``objective`` MarScfFlow.normal_flow gets from FlowNet: log p(x + u) over
     [0, 256)^D, i.e. including -D ln 256), and the gradient of mean bits/dim
     = mean(nll), nll = -objective / (D ln 2), the official training loss, for every parameter,
     plus intermediate activations (each level's output after its K steps and the log-det of
     those steps, every coupling network's output, every prior's per-image log-likelihood and
     (mean, log sigma)).

In float32 the official forward runs as it is (MarScfFlow.forward). In float64 the same lines
run with one change (``log_prob``): normal_flow starts its log-det from torch.zeros(B) (float32)
plus the python float -D ln 256, which rounds -5678.2 to float32 (up to 2.4e-4 nats) before the
float64 terms are added; the float64 run starts from a float64 zero instead.

Keys of the .npz: param/<name>, buffer/<name> (the state compared), unused/<name> (the
parameters the loss never reaches: the top prior's z1_cond_network), images (uint8 NHWC), u,
init_u, pre_init/<name>, post_init/<name>, post_init_eps0_float64/<name>, and
<dtype>/{logp, grad/<name>, act/<tag>}.

    /work/official/venv/bin/python benchmarks/marscf_official/equivalence_official.py \\
        --official_repo=/work/official/marscf --out=/tmp/marscf_equiv.npz
    .venv/bin/python benchmarks/marscf_official/equivalence_tfflows.py \\
        --official_npz=/tmp/marscf_equiv.npz

(Run single-threaded: torch.set_num_threads(1) here; the tfflows side sets TF's thread env.)
"""

import argparse
import contextlib
import copy
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import official_train  # noqa: E402  pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True, help='checkout of visinf/mar-scf')
  p.add_argument('--data', default=os.path.join(HERE, '..', '..', 'tfflows', 'data',
                                                'mnist5k.npz'))
  p.add_argument('--out', required=True, help='the .npz to write')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--perturb', type=float, default=0.1,
                 help='relative size of the Gaussian perturbation of every parameter (0: none)')
  p.add_argument('--dtypes', default='float32,float64')
  p.add_argument('--official_flags', default='',
                 help="extra official_train.py flags (architecture), e.g. '--steps_per_level=2'")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- noise feeding
@contextlib.contextmanager
def fixed_noise(u_nchw):
  """torch.rand of u's shape (MarScfFlow.normal_flow's dequantization draw) returns u; other
  shapes (the priors' dropout_in, which drops nothing at dp_rate = 0) draw as usual."""
  original_rand = torch.rand
  used = []

  def rand(*shape, **kwargs):
    size = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
    if tuple(size) == tuple(u_nchw.shape):
      used.append(None)
      return u_nchw.to(kwargs.get('dtype') or u_nchw.dtype)
    return original_rand(*shape, **kwargs)

  torch.rand = rand
  try:
    yield
  finally:
    torch.rand = original_rand
  assert len(used) == 1, f'the dequantization noise was drawn {len(used)} times'


# ----------------------------------------------------------------------------- recording
def level_steps(model):
  """[[FlowStep, ...] per level] in flow order."""
  levels, current = [], []
  for layer in model.flow.layers:
    kind = type(layer).__name__
    if kind == 'SqueezeLayer':
      current = []
      levels.append(current)
    elif kind == 'FlowStep':
      current.append(layer)
  return levels


class Recorder:
  """Forward hooks storing intermediate outputs under readable tags (official layouts):

    level<i>/out             the output of level i's K steps, before the split [B, C, H, W]
    level<i>/logdet          the log-det of those K steps [B]: the difference of FlowNet's
                             accumulated log-det after and before them (level<i>/logdet_in,
                             which holds -D ln 256 and the levels and priors below; in float32
                             the difference is exact only to the rounding of that sum)
    level<i>/step<k>/nn_out  coupling network output [B, C, H, W] (channel 2j: shift of
                             dimension j, 2j + 1: its unconstrained scale)
    prior<l>/log_likelihood  ChannelPriorUniScale (official level l = 1..L) output [B]
    prior<l>/params          its ConvSeqEncoder output [B, T, 2, H, W] ((mean, log sigma) of
                             channel t at time step t)
  """

  def __init__(self, model):
    self.acts, self.handles, self._logdet_in = {}, [], {}
    for i, steps in enumerate(level_steps(model)):
      self.handles.append(steps[0].register_forward_pre_hook(
          lambda _, args, i=i: self._logdet_in.__setitem__(i, args[1].detach().clone())))

      def level_out(_, __, out, i=i):
        self._put(f'level{i}/out', out[0])
        self._put(f'level{i}/logdet', out[1] - self._logdet_in[i])
        self._put(f'level{i}/logdet_in', self._logdet_in[i])
      self.handles.append(steps[-1].register_forward_hook(level_out))
      for k, step in enumerate(steps):
        self._hook(step.coupling.NN_net, f'level{i}/step{k}/nn_out')
    for j, prior in enumerate(model.flow.c_prior.prior_list):
      self._hook(prior, f'prior{j + 1}/log_likelihood')
      self._hook(prior.prior_lstm, f'prior{j + 1}/params', first=True)

  def _put(self, tag, value):
    self.acts[tag] = value.detach().numpy().copy()

  def _hook(self, module, tag, first=False):
    def hook(_, __, out):
      self._put(tag, out[0] if first else out)
    self.handles.append(module.register_forward_hook(hook))

  def close(self):
    for h in self.handles:
      h.remove()


# ----------------------------------------------------------------------------- the model
def perturb_(model, scale, generator):
  """p += scale * sd * N(0, 1), sd = RMS(p), or 1/sqrt(fan_in) (all-zero conv kernels), or 1."""
  with torch.no_grad():
    for _, p in model.named_parameters():
      rms = p.pow(2).mean().sqrt().item()
      if rms > 0:
        sd = rms
      elif p.dim() >= 2:
        sd = 1. / math.sqrt(p[0].numel())
      else:
        sd = 1.
      p.add_(scale * sd * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def log_prob(model, x):
  """(log p(x + u) [B] in nats, nll [B] in bits/dim) as MarScfFlow.normal_flow computes them
  (the objective it gets from FlowNet and nll = -objective / (D ln 2)). float32: the official
  forward itself. float64: normal_flow's lines with a float64 starting log-det (module doc)."""
  dims = x[0].numel()
  if x.dtype == torch.float32:
    captured = []
    handle = model.flow.register_forward_hook(lambda _, __, out: captured.append(out[1]))
    try:
      _, nll, _ = model(x)
    finally:
      handle.remove()
    return captured[0], nll
  z = x + torch.rand(x.size()) * (1. / 256.)      # (the fixed u, in x's dtype)
  logdet = torch.zeros(x.size(0), dtype=x.dtype)
  logdet = logdet + float(-np.log(256.) * dims)
  z, objective = model.flow(z, logdet=logdet, reverse=False)
  nll = (-objective) / float(np.log(2.) * dims)
  return objective, nll


def evaluate(model, x, u):
  """(log p [B], {param: grad of mean bits/dim}, activations) in training mode."""
  model.train()
  model.zero_grad(set_to_none=True)
  recorder = Recorder(model)
  try:
    with fixed_noise(u):
      lp, nll = log_prob(model, x)
  finally:
    recorder.close()
  torch.mean(nll).backward()            # the official training loss
  grads = {n: (p.grad.detach().numpy().copy() if p.grad is not None
               else np.zeros(p.shape, p.detach().numpy().dtype))
           for n, p in model.named_parameters()}
  unused = [n for n, p in model.named_parameters() if p.grad is None]
  return lp.detach().numpy(), grads, recorder.acts, unused


def nchw(a, dtype):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dtype)


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(1)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)
  official = official_train.parse_args([f'--official_repo={args.official_repo}'] +
                                       args.official_flags.split())
  with np.load(args.data) as npz:
    images = npz['x_train'][:args.batch]                           # uint8 [B, 32, 32, 1]
  model = official_train.build_model(official, images.shape[1:])
  x = official_train.to_tensor(images)                             # x / 256 - 0.5 [B, 1, 32, 32]
  rng = np.random.RandomState(args.seed + 2)
  init_u = rng.uniform(size=images.shape)
  u = rng.uniform(size=images.shape)
  out = {'images': images, 'u': u, 'perturb': np.float64(args.perturb), 'init_u': init_u}

  # ActNorm data-dependent initialisation: one training-mode pass on the digits, with given
  # noise so that tfflows' initialisation can be compared too (pre_init/ -> post_init/).
  for n, v in model.state_dict().items():
    out[f'pre_init/{n}'] = v.detach().numpy().copy()
  model.train()
  with torch.no_grad(), fixed_noise(nchw(init_u, torch.float32)):
    model(x)
  flags = [m.is_initialized.item() for m in model.modules() if hasattr(m, 'is_initialized')]
  assert flags and all(f == 1 for f in flags), flags
  for n, v in model.state_dict().items():
    if 'actnorm' in n and (n.endswith('.bias') or n.endswith('.logs')):
      out[f'post_init/{n}'] = v.detach().numpy().copy()
  # The same initialisation in float64 with Actnormlayer's eps (logs = log(1 / (std + eps)))
  # set to 0, tfflows' -log(std): isolates the eps term from the rest of the procedure.
  m64 = official_train.build_model(official, images.shape[1:]).to(torch.float64)
  m64.load_state_dict({n[len('pre_init/'):]: torch.from_numpy(v) for n, v in out.items()
                       if n.startswith('pre_init/')})
  for m in m64.modules():
    if hasattr(m, 'is_initialized'):
      m.eps = 0.
  m64.train()
  with torch.no_grad(), fixed_noise(nchw(init_u, torch.float64)):
    log_prob(m64, x.to(torch.float64))
  for n, v in m64.state_dict().items():
    if 'actnorm' in n and (n.endswith('.bias') or n.endswith('.logs')):
      out[f'post_init_eps0_float64/{n}'] = v.detach().numpy().copy()

  if args.perturb > 0:
    perturb_(model, args.perturb, torch.Generator().manual_seed(args.seed + 1))
  state = copy.deepcopy(model.state_dict())
  parameters = dict(model.named_parameters())
  for n, p in state.items():
    out[('param/' if n in parameters else 'buffer/') + n] = p.detach().numpy().copy()

  for dtype_name in args.dtypes.split(','):
    dtype = getattr(torch, dtype_name)
    m = official_train.build_model(official, images.shape[1:]).to(dtype)
    m.load_state_dict(state)
    lp, grads, acts, unused = evaluate(m, x.to(dtype), nchw(u, dtype))
    out[f'{dtype_name}/logp'] = lp
    for n, g in grads.items():
      out[f'{dtype_name}/grad/{n}'] = g
    for n, a in acts.items():
      out[f'{dtype_name}/act/{n}'] = a
    for n in unused:
      out[f'unused/{n}'] = np.float64(parameters[n].numel())
    print(f'{dtype_name}: log p = {np.array2string(lp, precision=4)} nats, mean bits/dim '
          f'{np.mean(-lp) / (images[0].size * math.log(2.)):.6f}', flush=True)
  np.savez(args.out, **out)
  total = sum(p.numel() for p in model.parameters() if p.requires_grad)
  n_unused = sum(parameters[n].numel() for n in unused)
  print(f'wrote {args.out} ({len(out)} arrays; {total:,} parameters, {total - n_unused:,} '
        f'reached by the loss, {n_unused:,} not: {", ".join(unused)})')


if __name__ == '__main__':
  main()
