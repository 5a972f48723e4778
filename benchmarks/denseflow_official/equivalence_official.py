"""Equivalence check, official side: the official PyTorch DenseFlow's log-likelihood and
gradients for given weights and given noise, written to an .npz for ``equivalence_tfflows.py``.

The check asks whether tfflows' DenseFlow computes the same function as the authors' code
(github.com/matejgrcic/DenseFlow): with IDENTICAL weights and IDENTICAL noise (dequantization
noise u and the cross-unit noise e), the per-image log-likelihood and the gradient of the mean
bits/dim with respect to every parameter must agree to rounding. This program (run with a
Python that has torch) does the official half:

  1. builds the official model exactly as ``official_train.py`` does (``build_model``, the
     defaults of its ``parse_args``: the configs/mnist.flags architecture, attention='official'),
     torch.manual_seed(seed);
  2. one training-mode forward pass on the first --batch digits of mnist5k.npz's x_train
     data-initialises every ActNorm (and moves the batch-norm running statistics once), as the
     first training step does; it runs on given noise (init_u, init_noise/<i>), and the state
     before (pre_init/<name>) and the ActNorm parameters after it (post_init/<name>) are kept,
     so that tfflows' data-dependent initialisation can be compared as well;
  3. --perturb > 0 (default 0.1) then adds Gaussian noise to every parameter (sd = perturb x the
     parameter tensor's RMS, or x 1/sqrt(fan_in) / x 1 for the all-zero tensors): at
     initialisation the zero-initialised last convolutions make every coupling the identity and
     every gradient inside the coupling networks exactly zero, which would test nothing there;
  4. draws u ~ U[0, 1) [B, 32, 32, 1] and e ~ N(0, I) (one tensor per cross-unit coupling,
     [B, H, W, growth]) with numpy (NHWC, stored as such), and feeds them to the model by
     monkeypatching torch.rand (UniformDequantization.forward's only random call) and each
     InvertibleDenseBlock's noise_dist.sample;
  5. for float32 (the official training dtype) and float64 (a fresh model given the same
     weights, to separate rounding from real differences), in training mode (batch statistics,
     as training uses), in eval mode (the running statistics of the state) and in eval mode
     after one training-mode pass has moved the running statistics (each side by its own
     rule): log p per image (Flow.log_prob; in float64 the same sum with a float64
     accumulator, because Flow.log_prob accumulates in a float32 buffer, and the dequantizer's
     log-det constant in float64, see main) and the gradient of mean bits/dim
     = mean(-log p) / (D ln 2) for every parameter, plus intermediate activations (each dense
     block's, unit's and transition's output and log-det, every coupling network's (scale,
     shift) and every cross-unit (mu, log_scale)) and the batch-norm running statistics after
     the pass.

Keys of the .npz: param/<name>, buffer/<name> (the state compared), images (uint8 NHWC), u,
noise/<i> (NHWC), init_u, init_noise/<i>, pre_init/<name>, post_init/<name>, and
<dtype>/<mode>/{logp, grad/<name>, act/<tag>, bn_after/<name>} for mode in train, eval,
eval_after_train.

    /work/official/venv/bin/python benchmarks/denseflow_official/equivalence_official.py \\
        --official_repo=/work/official/denseflow --out=/tmp/denseflow_equiv.npz
    .venv/bin/python benchmarks/denseflow_official/equivalence_tfflows.py \\
        --official_npz=/tmp/denseflow_equiv.npz

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
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import official_train  # noqa: E402  pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True, help='checkout of matejgrcic/DenseFlow')
  p.add_argument('--data', default=os.path.join(HERE, '..', '..', 'tfflows', 'data',
                                                'mnist5k.npz'))
  p.add_argument('--out', required=True, help='the .npz to write')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--perturb', type=float, default=0.1,
                 help='relative size of the Gaussian perturbation of every parameter (0: none)')
  p.add_argument('--dtypes', default='float32,float64')
  p.add_argument('--official_flags', default='',
                 help="extra official_train.py flags, e.g. '--attention=published'")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- noise feeding
@contextlib.contextmanager
def fixed_noise(model, u_nchw, noise_nchw):
  """torch.rand (UniformDequantization's only random call) returns u; each InvertibleDenseBlock
  with cross-unit coupling samples its given noise tensors in order."""
  original_rand = torch.rand

  def rand(*shape, **kwargs):
    shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
    assert tuple(shape) == tuple(u_nchw.shape), (shape, u_nchw.shape)
    return u_nchw.to(kwargs.get('dtype') or u_nchw.dtype)

  blocks = [m for m in model.transforms if hasattr(m, 'noise_dist') and m.num_steps > 1]
  queue = list(noise_nchw)
  patched = []
  for block in blocks:
    mine = [queue.pop(0) for _ in range(block.num_steps - 1)]

    def sample(shape, mine=mine):
      e = mine.pop(0)
      assert tuple(shape) == tuple(e.shape), (shape, e.shape)
      return e
    block.noise_dist.sample = sample
    patched.append(block)
  assert not queue, 'more noise tensors than cross-unit couplings'
  torch.rand = rand
  try:
    yield
  finally:
    torch.rand = original_rand
    for block in patched:
      del block.noise_dist.sample


# ----------------------------------------------------------------------------- recording
class Recorder:
  """Forward hooks storing intermediate outputs under readable tags (call order)."""

  def __init__(self, model):
    self.acts, self.handles = {}, []
    for t, transform in enumerate(model.transforms):
      kind = type(transform).__name__
      if kind == 'InvertibleDenseBlock':
        self._hook(transform, f't{t}_block', pair=True)
        for u, unit in enumerate(transform.blocks.children()):
          self._hook(unit, f't{t}_block/unit{u}', pair=True)
          for s, step in enumerate(unit.transforms):
            net = step.transforms[2].coupling_net
            self._hook(net, f't{t}_block/unit{u}/step{s}/coupling_params')  # [B,C,H,W,2]
        for i, g in enumerate(transform.noise_params):
          self._hook(g, f't{t}_block/cross{i + 1}', pair=True)             # (mu, log_scale)
      elif kind == 'InvertibleTransition':
        self._hook(transform, f't{t}_transition', pair=True)                 # (kept, log p)

  def _hook(self, module, tag, pair=False):
    def hook(_, __, out):
      if pair:
        self.acts[tag + '/0'] = out[0].detach().numpy().copy()
        self.acts[tag + '/1'] = out[1].detach().numpy().copy()
      else:
        self.acts[tag] = out.detach().numpy().copy()
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
  """Flow.log_prob in the model's dtype: the official loop with an accumulator of x's dtype
  (Flow.log_prob's torch.zeros(...) is float32, which would round a float64 sum)."""
  if x.dtype == torch.float32:
    return model.log_prob(x)
  total = torch.zeros(x.shape[0], dtype=x.dtype)
  for transform in model.transforms:
    x, ldj = transform(x)
    total = total + ldj
  return total + model.base_dist.log_prob(x)


def evaluate(model, images, u, noise, train):
  """(log p [B], {param: grad of mean bits/dim}, activations, BN statistics after the pass)."""
  model.train(train)
  model.zero_grad(set_to_none=True)
  recorder = Recorder(model)
  with fixed_noise(model, u, noise):
    lp = log_prob(model, images)
  recorder.close()
  bpd = (-lp / (images[0].numel() * math.log(2.))).mean()
  bpd.backward()
  grads = {n: (p.grad.detach().numpy().copy() if p.grad is not None
               else np.zeros(p.shape, p.detach().numpy().dtype))
           for n, p in model.named_parameters()}
  bn = {n: b.detach().numpy().copy() for n, b in model.named_buffers()
        if 'running_' in n}
  return lp.detach().numpy(), grads, recorder.acts, bn


def draw_noise(rng, official, batch, image_shape):
  """u ~ U[0, 1) [B, H, W, C] and one e ~ N(0, I) [B, h, w, growth] per cross-unit coupling
  (float64, NHWC)."""
  u = rng.uniform(size=(batch,) + tuple(image_shape))
  noise = []
  h, w = image_shape[0] // 2, image_shape[1] // 2
  for units in official_train.ints(official.block_conf):
    for _ in range(units - 1):
      noise.append(rng.standard_normal((batch, h, w, official.growth_rate)))
    h, w = h // 2, w // 2
  return u, noise


def nchw(a, dtype):
  return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dtype)


MODES = (('train', (True,)), ('eval', (False,)),
         # eval with the running statistics after one training-mode pass (each side's own
         # update rule): isolates the running-variance convention
         ('eval_after_train', (True, False)))


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(1)
  torch.manual_seed(args.seed)
  official = official_train.parse_args([f'--official_repo={args.official_repo}'] +
                                       args.official_flags.split())
  model = official_train.build_model(official)
  with np.load(args.data) as npz:
    images = npz['x_train'][:args.batch]                           # uint8 [B, 32, 32, 1]
  x = official_train.to_tensor(images)                             # float [B, 1, 32, 32]
  rng = np.random.RandomState(args.seed + 2)
  init_u, init_noise = draw_noise(rng, official, args.batch, images.shape[1:])
  u, noise = draw_noise(rng, official, args.batch, images.shape[1:])
  out = {'images': images, 'u': u, 'perturb': np.float64(args.perturb), 'init_u': init_u}
  for i, e in enumerate(noise):
    out[f'noise/{i}'] = e
  for i, e in enumerate(init_noise):
    out[f'init_noise/{i}'] = e

  # ActNorm data-dependent initialisation: one training-mode pass on the digits, with given
  # noise so that tfflows' initialisation can be compared too (pre_init/ -> post_init/).
  for n, v in model.state_dict().items():
    out[f'pre_init/{n}'] = v.detach().numpy().copy()
  model.train()
  with torch.no_grad(), fixed_noise(model, nchw(init_u, torch.float32),
                                    [nchw(e, torch.float32) for e in init_noise]):
    model.log_prob(x)
  assert all(m.initialized.item() == 1 for m in model.modules() if hasattr(m, 'initialized'))
  for n, v in model.state_dict().items():
    if n.endswith('.shift') or n.endswith('.log_scale'):
      out[f'post_init/{n}'] = v.detach().numpy().copy()

  if args.perturb > 0:
    perturb_(model, args.perturb, torch.Generator().manual_seed(args.seed + 1))
  state = copy.deepcopy(model.state_dict())
  parameters = dict(model.named_parameters())
  for n, p in state.items():
    out[('param/' if n in parameters else 'buffer/') + n] = p.detach().numpy().copy()

  for dtype_name in args.dtypes.split(','):
    dtype = getattr(torch, dtype_name)
    # A fresh model, not copy.deepcopy(model): DenseNet keeps its forward in a closure
    # (cp_func) that a deep copy shares with the original, whose layers it would keep running.
    m = official_train.build_model(official).to(dtype)
    # u, e and the weights are cast from the same float64 / float32 numbers on both sides.
    u_t, e_t = nchw(u, dtype), [nchw(e, dtype) for e in noise]
    for mode, passes in MODES:
      m.load_state_dict(state)      # the same weights and running statistics for each mode
      if dtype == torch.float64:
        # UniformDequantization's log-det constant is a buffer made in float32
        # (-log(torch.tensor(256, dtype=torch.float))); .double() keeps its float32 rounding,
        # 1024 x 1.5e-8 = 1.6e-5 nats per image. In float32 both sides use float32(-ln 256);
        # in float64 give it its float64 value, as tfflows has.
        m.transforms[0].ldj_per_dim.fill_(-math.log(256.))
      for train in passes:
        lp, grads, acts, bn = evaluate(m, x.to(dtype), u_t, e_t, train)
      key = f'{dtype_name}/{mode}'
      out[f'{key}/logp'] = lp
      for n, g in grads.items():
        out[f'{key}/grad/{n}'] = g
      for n, a in acts.items():
        out[f'{key}/act/{n}'] = a
      for n, b in bn.items():
        out[f'{key}/bn_after/{n}'] = b
      print(f'{key}: log p = {np.array2string(lp, precision=4)} nats, mean bits/dim '
            f'{np.mean(-lp) / (images[0].size * math.log(2.)):.6f}', flush=True)
  np.savez(args.out, **out)
  print(f'wrote {args.out} ({len(out)} arrays; '
        f'{sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters)')


if __name__ == '__main__':
  main()
