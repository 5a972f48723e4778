"""Train the official PyTorch DenseFlow on tfflows' embedded digits, as tfflows trains its own.

This program runs the authors' model code (github.com/matejgrcic/DenseFlow, a checkout named by
--official_repo; it is not part of tfflows and is not copied here) under the same data, schedule
and scoring as ``python -m train.main --flagfile=configs/mnist.flags``, so the two learning
curves can be compared side by side (``compare_official.py`` runs both and prints the table).

What is the same on both sides:
  data         tfflows/data/mnist5k.npz: 4,500 training and 500 test digits, 32x32x1 uint8,
               uniform dequantization z = (x + u) / 256; a new random order each epoch,
               140 batches of 32 (the last partial batch dropped)
  model        the official DenseFlow (ScalarAffine(-0.5), squeeze, InvertibleDenseBlock /
               InvertibleTransition, ConvNormal2d top prior) with uniform dequantization and the
               coupling network's dense block set to --dense_layers x --dense_growth (the
               official DNMH hard-codes 7 x 64)
  optimiser    Adamax(lr, betas (0.9, 0.999), eps 1e-7), gradients clipped at global norm 100,
               lr(t) = base * min(1, (t + 1) / warmup) * decay ** floor(t / steps_per_epoch)
               (tfflows' schedule; the official LinearWarmupScheduler would drop the decay)
  scoring      before each test evaluation, the batch-norm running statistics are recomputed
               from --bn_refresh_batches training batches (as tfflows' BatchNormRefresh does);
               the test bound is the mean one-sample bits/dim over the 500 test digits; at the
               end the importance-weighted estimate with k = --iw_samples

Ablation switches change one thing of the official model at a time (``--attention``,
``--init``). The result is one JSON file (--out) and a line per epoch on stdout.

    python official_train.py --official_repo=/path/to/DenseFlow --seed=0 --out=run.json
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--official_repo', required=True, help='checkout of matejgrcic/DenseFlow')
  p.add_argument('--data', default=os.path.join(os.path.dirname(__file__), '..', '..', 'tfflows',
                                                'data', 'mnist5k.npz'))
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--epochs', type=int, default=8)
  p.add_argument('--steps_per_epoch', type=int, default=140)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--eval_batch_size', type=int, default=100)
  p.add_argument('--learning_rate', type=float, default=1e-3)
  p.add_argument('--warmup_steps', type=int, default=200)
  p.add_argument('--lr_decay', type=float, default=0.95)
  p.add_argument('--max_grad_norm', type=float, default=100.)
  p.add_argument('--epsilon', type=float, default=1e-7)
  p.add_argument('--block_conf', default='2,2,1')
  p.add_argument('--layers_conf', default='2,2,2')
  p.add_argument('--layer_mid_channels', default='32,32,32')
  p.add_argument('--growth_rate', type=int, default=4)
  p.add_argument('--dense_layers', type=int, default=3)
  p.add_argument('--dense_growth', type=int, default=32)
  p.add_argument('--bn_refresh_batches', type=int, default=8)
  p.add_argument('--iw_samples', type=int, default=16)
  p.add_argument('--eval_epochs', default='all', help="'all' or a comma list of epochs")
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
  p.add_argument('--attention', default='official', choices=['official', 'published'],
                 help="official: the authors' NystromAttention; published: softmax attention "
                      'over pixel positions (tfflows --attention=published)')
  p.add_argument('--init', default='torch', choices=['torch', 'keras'],
                 help="keras: Glorot-uniform conv kernels and zero biases (Keras' defaults)")
  p.add_argument('--out', default=None, help='JSON file for the results')
  return p.parse_args(argv)


def ints(text):
  return [int(v) for v in text.split(',')]


# ----------------------------------------------------------------------------- the model
def import_official(repo):
  repo = os.path.abspath(repo)
  sys.path[:0] = [repo, os.path.join(repo, 'experiments', 'image')]
  from model import affine_coupling, flow_modules  # pylint: disable=import-outside-toplevel
  from denseflow.flows import Flow  # pylint: disable=import-outside-toplevel
  from denseflow import transforms, distributions  # pylint: disable=import-outside-toplevel
  from denseflow.nn.blocks import attention  # pylint: disable=import-outside-toplevel
  return affine_coupling, flow_modules, Flow, transforms, distributions, attention


class PublishedNystrom(nn.Module):
  """Nystrom attention over the H*W pixel positions (softmax over keys, 1/sqrt(d) scaling, no
  residual), with the same projections as the official module: tfflows' published form."""

  def __init__(self, in_channels, embed_dim, num_landmarks, iterations=6):
    super().__init__()
    self.qkv = nn.Conv2d(in_channels, 3 * embed_dim, 1)
    self.out_transform = nn.Conv2d(embed_dim, in_channels, 1)
    self.embed_dim, self.num_landmarks, self.iterations = embed_dim, num_landmarks, iterations

  def forward(self, x):
    n, _, h, w = x.shape
    t = self.qkv(x).flatten(2).transpose(1, 2)                  # [N, HW, 3E], tokens = pixels
    q, k, v = t.chunk(3, dim=-1)
    scale = self.embed_dim ** -0.5
    land = lambda a: a.reshape(n, self.num_landmarks, -1, self.embed_dim).mean(2)  # noqa: E731
    ql, kl = land(q), land(k)
    f = torch.softmax(q @ kl.transpose(1, 2) * scale, -1)
    a = torch.softmax(ql @ kl.transpose(1, 2) * scale, -1)
    b = torch.softmax(ql @ k.transpose(1, 2) * scale, -1)
    out = f @ (pinv(a, self.iterations) @ (b @ v))
    return self.out_transform(out.transpose(1, 2).reshape(n, self.embed_dim, h, w))


def pinv(a, iterations):
  eye = torch.eye(a.shape[-1])
  z = a.transpose(-1, -2) / (a.abs().sum(-2).amax(-1) * a.abs().sum(-1).amax(-1))[:, None, None]
  for _ in range(iterations):
    az = a @ z
    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
  return z


def build_model(args):
  (affine_coupling, flow_modules, flow_cls, transforms, distributions,
   attention) = import_official(args.official_repo)
  # The official coupling network hard-codes its dense block (7 layers of growth 64): set it.
  original = affine_coupling.DenseNetMultihead
  def dense_net_multihead(*a, **kw):
    kw.update(depth=args.dense_layers, growth=args.dense_growth)
    return original(*a, **kw)
  affine_coupling.DenseNetMultihead = dense_net_multihead
  if args.attention == 'published':
    attention_module = sys.modules['denseflow.nn.blocks.denseblock']
    attention_module.NystromAttention = PublishedNystrom

  block_conf, layers_conf = ints(args.block_conf), ints(args.layers_conf)
  mids = ints(args.layer_mid_channels)
  c, h, w = 1, 32, 32
  layers = [transforms.UniformDequantization(num_bits=8),
            transforms.ScalarAffineBijection(shift=-0.5), transforms.Squeeze2d()]
  c, h, w = 4 * c, h // 2, w // 2
  for i, units in enumerate(block_conf):
    layers.append(flow_modules.InvertibleDenseBlock(c, units, layers_conf[i], mids[i],
                                                    growth_rate=args.growth_rate,
                                                    checkpointing=False))
    c += args.growth_rate * (units - 1)
    if i != len(block_conf) - 1:
      layers.append(flow_modules.InvertibleTransition(c))
      c, h, w = 2 * c, h // 2, w // 2
  model = flow_cls(base_dist=distributions.ConvNormal2d((c, h, w)), transforms=layers)
  if args.init == 'keras':
    keras_init(model)
  return model


def keras_init(model):
  """Glorot-uniform kernels, zero biases for every Conv2d whose weights are not all zero (the
  zero-initialised output convolutions stay zero)."""
  for m in model.modules():
    if isinstance(m, nn.Conv2d) and m.weight.abs().sum() > 0:
      nn.init.xavier_uniform_(m.weight)
      if m.bias is not None:
        nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ training
def bits_per_dim(log_prob, dims):
  return -log_prob / (dims * math.log(2.))


def learning_rate(args, step):
  warm = min(1., (step + 1) / args.warmup_steps) if args.warmup_steps else 1.
  return args.learning_rate * warm * args.lr_decay ** (step // args.steps_per_epoch)


def to_tensor(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()


@torch.no_grad()
def refresh_batch_norm(model, train, rng, args):
  """Running statistics = the average of the batch statistics of training batches under the
  current weights (training-mode passes; the torch random state is restored afterwards)."""
  norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  if not norms or args.bn_refresh_batches < 1:
    return
  state = torch.get_rng_state()
  for m in norms:
    m.reset_running_stats()
    m.momentum = None          # cumulative average over the refresh batches
  model.train()
  order = rng.permutation(len(train))
  for i in range(args.bn_refresh_batches):
    model.log_prob(to_tensor(train[order[i * args.batch_size:(i + 1) * args.batch_size]]))
  for m in norms:
    m.momentum = 0.1
  torch.set_rng_state(state)


@torch.no_grad()
def test_bound(model, test, args):
  model.eval()
  total = 0.
  for i in range(0, len(test), args.eval_batch_size):
    total += model.log_prob(to_tensor(test[i:i + args.eval_batch_size])).sum().item()
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
      log_w.append(model.log_prob(x.repeat(k, 1, 1, 1)).reshape(k, len(x)))
    log_w = torch.cat(log_w, 0)
    total += (torch.logsumexp(log_w, 0) - math.log(args.iw_samples)).sum().item()
  return bits_per_dim(total / len(test), test[0].size)


def main(argv=None):
  args = parse_args(argv)
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  rng = np.random.RandomState(args.seed)
  refresh_rng = np.random.RandomState(args.seed + 1)
  with np.load(args.data) as npz:
    train, test = npz['x_train'], npz['x_test']
  model = build_model(args)
  params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  print(f'official DenseFlow: {params:,} trainable parameters, attention={args.attention}, '
        f'init={args.init}', flush=True)
  optimizer = torch.optim.Adamax(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.999),
                                 eps=args.epsilon)
  eval_epochs = (set(range(1, args.epochs + 1)) if args.eval_epochs == 'all'
                 else set(ints(args.eval_epochs)))
  result = dict(side='official', seed=args.seed, parameters=params, attention=args.attention,
                init=args.init, epochs=[])
  step, start = 0, time.time()
  for epoch in range(1, args.epochs + 1):
    model.train()
    order = rng.permutation(len(train))
    bpds, norms = [], []
    for b in range(args.steps_per_epoch):
      batch = to_tensor(train[order[b * args.batch_size:(b + 1) * args.batch_size]])
      for group in optimizer.param_groups:
        group['lr'] = learning_rate(args, step)
      optimizer.zero_grad()
      loss = bits_per_dim(model.log_prob(batch), batch[0].numel()).mean()
      loss.backward()
      norm = nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
      optimizer.step()
      step += 1
      bpds.append(loss.item())
      norms.append(norm.item())
    row = dict(epoch=epoch, step=step, train_bpd=float(np.mean(bpds)),
               grad_norm_mean=float(np.mean(norms)), grad_norm_max=float(np.max(norms)),
               seconds=time.time() - start)
    if epoch in eval_epochs:
      refresh_batch_norm(model, train, refresh_rng, args)
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
