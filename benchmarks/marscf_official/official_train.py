"""Train the official PyTorch mAR-SCF (affine) on tfflows' embedded digits as tfflows trains it.

This program runs the authors' model code (github.com/visinf/mar-scf, a checkout named by
--official_repo; it is not part of tfflows and is not copied here) under the same data, schedule
and scoring as ``python -m train.main --flagfile=configs/marscf_affine_mnist.flags``, so the two
learning curves can be compared side by side.

What is the same on both sides:
  data         tfflows/data/mnist5k.npz: 4,500 training and 500 test digits, 32x32x1 uint8;
               uniform dequantization onto [-0.5, 0.5): z = (x + u) / 256 - 0.5 (tfflows'
               ToUnitInterval). The harness feeds x / 256 - 0.5 to ``MarScfFlow``, whose forward
               adds u / 256 itself and counts -D ln 256 with D = 32 * 32 * 1. (The official data
               loaders feed ToTensor() - 0.5 = x / 255 - 0.5 of MNIST padded to 32x32 and
               replicated to 3 channels; not used here.) A new random order each epoch, 140
               batches of 32 (the last partial batch dropped; tfflows' pipeline streams
               successive permutations instead, shuffle -> repeat -> batch, so its 20 left-over
               images open the next epoch).
  model        the official ``MarScfFlow`` / ``FlowNet`` (marscf_main.py) with coupling='affine':
               L = --num_levels levels of squeeze -> K = --steps_per_level x (ActNorm -> LU 1x1
               conv -> affine coupling, sigmoid(h + 2) scale, conditioner of --width channels)
               -> split, and mAR priors ``ChannelPriorMultiScale``
  optimiser    Adamax(lr, betas (0.9, 0.999), eps --epsilon = 1e-7 (Keras' default)); gradient
               clipping at global norm --max_grad_norm only if > 0 (tfflows' --max_grad_norm
               defaults to 0 and the flagfile does not set it); lr(t) = base * min(1, (t + 1) /
               warmup) * decay ** floor(t / steps_per_epoch) (tfflows' schedule; the official
               script uses Adamax(8e-4) with LambdaLR(min(1, images_seen / 10000)) and no decay)
  ActNorm      initialised on the first training batch by one training-mode pass before the
               first step (tfflows' ``FlowModel.initialize``; the official code initialises
               inside the first step's forward, on the same batch)
  scoring      the test bound is the mean one-sample bits/dim over the 500 test digits after each
               eval epoch; at the end the importance-weighted estimate with k = --iw_samples:
               log (1/k) sum_j w_j with w_j = p(x + u_j) (uniform dequantization, q = 1)

Harness-side patches (the official files are not edited; everything below is done on the
imported modules at run time):
  1. ``FlowNet`` hard-codes its prior as ChannelPriorMultiScale(batch_size, 3, 32, 32, L,
     num_layers=3, hidden_size=32): the image channels (3: the official MNIST loader replicates
     the digit to RGB), the ConvLSTM depth and width. The harness replaces the name
     ``marscf_main.ChannelPriorMultiScale`` by a wrapper that passes the image's channel count
     (1), its height and width, --mar_layers and --mar_hidden (flagfile: 2 and 16).
  2. ``ChannelPriorUniScale.get_likelihood`` builds its zero first input with the batch size
     given at construction, so any other batch (the 100-image test batches, the k-fold tiled IW
     batches) fails to concatenate. The harness sets ``batch_size`` from the latent's batch before
     each call.
  3. ``mar_prior/convolutional_rnn/utils.py`` calls ``collections.Iterable``, removed in Python
     3.10; the harness aliases it to ``collections.abc.Iterable``.
  4. Imports the model path never uses are stubbed when absent: torchvision and tqdm
     (marscf_main.py, utils.py, flow_modules/misc.py import them for data loading and
     progress bars), and scipy (flow_modules/common_modules.py uses scipy.linalg.lu once, to
     LU-factor the random orthogonal initial 1x1-conv matrix): the stub is LAPACK's getrf via
     torch.linalg.lu in float64, the same partial-pivoting factorisation P L U as scipy's.
Note: the official top-level prior (ChannelPriorUniScale at level L) builds a z1_cond_network
it never calls; its weights are counted in 'parameters' (all trainable weights, as the DenseFlow
harness counts) and reported separately as 'unused_parameters' (they get no gradient, and torch's
Adamax skips them).
The official code's own randomness (the orthogonal 1x1 init draws from numpy's global
generator) is seeded by --seed.

Ablation switches change one thing of the official model at a time towards tfflows'
(``--prior_head=zero``, ``--coupling_net=keras``). ``--initial_eval`` also scores the test
bound after ActNorm's initialisation, before the first step. The result is one JSON file (--out)
and a line per epoch on stdout.

    python official_train.py --official_repo=/path/to/mar-scf --seed=0 --out=run.json
"""

import argparse
import collections
import collections.abc
import importlib.machinery
import json
import math
import os
import sys
import time
import types

import numpy as np
import torch
from torch import nn


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True, help='checkout of visinf/mar-scf')
  p.add_argument('--data', default=os.path.join(os.path.dirname(__file__), '..', '..', 'tfflows',
                                                'data', 'mnist5k.npz'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--epochs', type=int, default=3)
  p.add_argument('--steps_per_epoch', type=int, default=140)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--eval_batch_size', type=int, default=100)
  p.add_argument('--learning_rate', type=float, default=2e-3)
  p.add_argument('--warmup_steps', type=int, default=50)
  p.add_argument('--lr_decay', type=float, default=0.95)
  p.add_argument('--max_grad_norm', type=float, default=0.,
                 help='clip gradients to this global norm; 0: no clipping (tfflows default)')
  p.add_argument('--epsilon', type=float, default=1e-7)
  p.add_argument('--num_levels', type=int, default=3)
  p.add_argument('--steps_per_level', type=int, default=4)
  p.add_argument('--width', type=int, default=32)
  p.add_argument('--mar_hidden', type=int, default=16)
  p.add_argument('--mar_layers', type=int, default=2)
  p.add_argument('--iw_samples', type=int, default=16)
  p.add_argument('--eval_epochs', default='all', help="'all' or a comma list of epochs")
  p.add_argument('--initial_eval', action='store_true',
                 help='also score the test bound after ActNorm initialisation, before training '
                      '(JSON key initial_test_bpd)')
  p.add_argument('--prior_head', default='official', choices=['official', 'zero'],
                 help="zero: the mAR priors' output convs start at zero (tfflows' MARPrior head: "
                      'every prior starts as N(0, I))')
  p.add_argument('--coupling_net', default='official', choices=['official', 'keras'],
                 help="keras: the coupling networks' two hidden convs as tfflows' GlowConditioner "
                      'has them (Glorot-uniform kernel, zero bias, no ActNorm)')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  p.add_argument('--out', default=None, help='JSON file for the results')
  return p.parse_args(argv)


def ints(text):
  return [int(v) for v in text.split(',')]


# ----------------------------------------------------------------------------- the model
_STUBS = []


def _stub(name, **attrs):
  module = types.ModuleType(name)
  module.__dict__.update(attrs)
  module.__spec__ = importlib.machinery.ModuleSpec(name, None)
  sys.modules[name] = module
  _STUBS.append(name)
  parent, _, child = name.rpartition('.')
  if parent:
    setattr(sys.modules[parent], child, module)
  return module


def _lu(a):
  """scipy.linalg.lu(a) -> (p, l, u) with a = p @ l @ u (LAPACK getrf, partial pivoting)."""
  p, l, u = torch.linalg.lu(torch.as_tensor(np.asarray(a, dtype=np.float64)))
  return p.numpy(), l.numpy(), u.numpy()


def _stub_unused_imports():
  """Stubs for the packages the official files import but the model path does not use."""
  try:
    import scipy.linalg  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    _stub('scipy')
    _stub('scipy.linalg', lu=_lu)
  try:
    import torchvision  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    _stub('torchvision')
    for name in ('datasets', 'transforms', 'utils'):
      _stub(f'torchvision.{name}')
    _stub('torchvision.transforms.functional')
  try:
    import tqdm  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    _stub('tqdm', tqdm=lambda it, *a, **k: it)


def import_official(repo):
  repo = os.path.abspath(repo)
  if not hasattr(collections, 'Iterable'):
    collections.Iterable = collections.abc.Iterable   # Python >= 3.10 (patch 3)
  _stub_unused_imports()
  sys.path[:0] = [repo]
  import marscf_main  # pylint: disable=import-outside-toplevel
  from mar_prior import corr_prior  # pylint: disable=import-outside-toplevel
  for name in _STUBS:   # the official modules keep their references; nothing else sees them
    sys.modules.pop(name, None)
  return marscf_main, corr_prior


def build_model(args, image_shape):
  marscf_main, corr_prior = import_official(args.official_repo)
  height, width, channels = image_shape

  # Patch 1: the prior's image channels, LSTM depth and width are hard-coded in FlowNet.
  original_prior = corr_prior.ChannelPriorMultiScale
  def channel_prior(batch_size, nc, h, w, levels, **kw):  # pylint: disable=unused-argument
    kw.update(num_layers=args.mar_layers, hidden_size=args.mar_hidden)
    return original_prior(batch_size, channels, height, width, levels, **kw)
  marscf_main.ChannelPriorMultiScale = channel_prior

  # Patch 2: the prior's first (zero) input takes its batch size from the latent.
  uni = corr_prior.ChannelPriorUniScale
  if not getattr(uni, '_harness_patched', False):
    original_likelihood = uni.get_likelihood
    def get_likelihood(self, z):
      self.batch_size = (z[1] if isinstance(z, tuple) else z).size(0)
      return original_likelihood(self, z)
    uni.get_likelihood = get_likelihood
    uni._harness_patched = True  # pylint: disable=protected-access

  model = marscf_main.MarScfFlow(args.batch_size, (height, width, channels), 'affine',
                                 args.num_levels, args.steps_per_level, args.width)
  if args.prior_head == 'zero':
    for prior in model.flow.c_prior.prior_list:
      nn.init.zeros_(prior.prior_lstm.conv_out1.weight)
      nn.init.zeros_(prior.prior_lstm.conv_out1.bias)
  if args.coupling_net == 'keras':
    for module in model.modules():
      if hasattr(module, 'conv1') and hasattr(module, 'conv3'):   # an NN_net
        module.conv1 = keras_conv(module.conv1)
        module.conv2 = keras_conv(module.conv2)
  return model


def keras_conv(conv):
  """A plain Conv2d of the same shape with Keras' defaults (Glorot-uniform, zero bias)."""
  plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
  nn.init.xavier_uniform_(plain.weight)
  nn.init.zeros_(plain.bias)
  return plain


def log_weight(model, values):
  """One-sample log w = log p(x + u) - D ln 256 in nats [B] for inputs x / 256 - 0.5."""
  _, nll, _ = model(values)
  return -nll * (values[0].numel() * math.log(2.))


# ------------------------------------------------------------------------------ training
def bits_per_dim(log_prob, dims):
  return -log_prob / (dims * math.log(2.))


def learning_rate(args, step):
  warm = min(1., (step + 1) / args.warmup_steps) if args.warmup_steps else 1.
  return args.learning_rate * warm * args.lr_decay ** (step // args.steps_per_epoch)


def to_tensor(images):
  """uint8 [B, H, W, C] -> float [B, C, H, W] = x / 256 - 0.5 (the model adds u / 256)."""
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
  return x / 256. - 0.5


@torch.no_grad()
def initialise_actnorm(model, batch):
  model.train()
  model(batch)
  fresh = [m for m in model.modules() if hasattr(m, 'is_initialized') and not m.is_initialized]
  if fresh:
    raise RuntimeError(f'{len(fresh)} ActNorm layers were not reached by the init pass')


@torch.no_grad()
def test_bound(model, test, args):
  model.eval()
  total = 0.
  for i in range(0, len(test), args.eval_batch_size):
    total += log_weight(model, to_tensor(test[i:i + args.eval_batch_size])).sum().item()
  return bits_per_dim(total / len(test), test[0].size)


@torch.no_grad()
def test_importance_weighted(model, test, args, chunk=4):
  model.eval()
  total = 0.
  for i in range(0, len(test), args.eval_batch_size):
    x = to_tensor(test[i:i + args.eval_batch_size])
    log_w = []
    for j in range(0, args.iw_samples, chunk):
      k = min(chunk, args.iw_samples - j)
      log_w.append(log_weight(model, x.repeat(k, 1, 1, 1)).reshape(k, len(x)))
    log_w = torch.cat(log_w, 0)
    total += (torch.logsumexp(log_w, 0) - math.log(args.iw_samples)).sum().item()
  return bits_per_dim(total / len(test), test[0].size)


def main(argv=None):
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)          # the official 1x1-conv init draws from numpy's generator
  rng = np.random.RandomState(args.seed)
  with np.load(args.data) as npz:
    train, test = npz['x_train'], npz['x_test']
  model = build_model(args, train.shape[1:])
  params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  print(f'official mAR-SCF (affine): {params:,} trainable parameters, '
        f'prior_head={args.prior_head}, coupling_net={args.coupling_net}', flush=True)
  optimizer = torch.optim.Adamax(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                 eps=args.epsilon)
  eval_epochs = (set(range(1, args.epochs + 1)) if args.eval_epochs == 'all'
                 else set(ints(args.eval_epochs)))
  result = dict(side='official', seed=args.seed, parameters=params, prior_head=args.prior_head,
                coupling_net=args.coupling_net, epochs=[])
  step, start = 0, time.time()
  order = rng.permutation(len(train))
  initialise_actnorm(model, to_tensor(train[order[:args.batch_size]]))
  if args.initial_eval:
    result['initial_test_bpd'] = test_bound(model, test, args)
    print(json.dumps({'initial_test_bpd': result['initial_test_bpd']}), flush=True)
  clip = args.max_grad_norm if args.max_grad_norm > 0 else float('inf')
  for epoch in range(1, args.epochs + 1):
    model.train()
    if epoch > 1:
      order = rng.permutation(len(train))
    bpds, norms = [], []
    for b in range(args.steps_per_epoch):
      batch = to_tensor(train[order[b * args.batch_size:(b + 1) * args.batch_size]])
      for group in optimizer.param_groups:
        group['lr'] = learning_rate(args, step)
      optimizer.zero_grad()
      loss = bits_per_dim(log_weight(model, batch), batch[0].numel()).mean()
      loss.backward()
      if step == 0:   # weights the loss never reaches (the top prior's unused r-embedding)
        result['unused_parameters'] = sum(p.numel() for p in model.parameters()
                                          if p.requires_grad and p.grad is None)
      norm = nn.utils.clip_grad_norm_(model.parameters(), clip)
      optimizer.step()
      step += 1
      bpds.append(loss.item())
      norms.append(norm.item())
    row = dict(epoch=epoch, step=step, train_bpd=float(np.mean(bpds)),
               grad_norm_mean=float(np.mean(norms)), grad_norm_max=float(np.max(norms)),
               seconds=time.time() - start)
    if epoch in eval_epochs:
      row['test_bpd'] = test_bound(model, test, args)
    result['epochs'].append(row)
    print(json.dumps(row), flush=True)
  if args.iw_samples > 1:
    result['final_bound'] = result['epochs'][-1].get('test_bpd')
    result['final_iw'] = test_importance_weighted(model, test, args)
    print(json.dumps({'final_bound': result['final_bound'], 'final_iw': result['final_iw'],
                      'k': args.iw_samples}), flush=True)
  result['seconds'] = time.time() - start
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
