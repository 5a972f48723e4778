"""Exactness check of the bits/dim accounting: the official mAR-SCF flow's weights in tfflows'.

Phase 'official' (a Python with torch): builds the official model as ``official_train.py`` does,
initialises ActNorm on the first training batch, gives every coupling's zero-initialised output
conv small random weights (so the couplings are not the identity), and makes two changes that
let the mAR priors transfer exactly: each ConvSeqEncoder's conv_embed becomes a pass-through of
its input channels (tfflows' first ConvLSTM cell reads [l^(j-1), embed(r)] directly), and the
log-scale channel of each head becomes the constant -0.2 (tfflows bounds log sigma softly); the
mean channel keeps its random weights, so the prior's mean depends on the LSTMs, the embedding
of r_i and the teacher-forced channel order. It writes the weights in tfflows' layout and the
per-image log-weights of the first 100 test digits at midpoint dequantization (u = 1/2) to
--npz.

Phase 'tfflows' (tfflows' venv): builds configs/marscf_affine_mnist.flags' model, loads those
weights (the coupling conditioners' hidden ActNorms fold into conv kernel and bias exactly:
(W * x + b) e^s = (e^s W) * x + e^s b; the output conv's interleaved shift/scale channels are
reordered to tfflows' [shift, raw] halves; the LSTM's two biases are summed; the head's raw
log-scale is set to 4 atanh(-0.2 / 4)) and prints the largest per-image difference of log w,
in nats and bits/dim.

    /path/to/torch/python accounting_check.py --phase=official --official_repo=... --npz=/tmp/a.npz
    .venv/bin/python accounting_check.py --phase=tfflows --npz=/tmp/a.npz
"""

import argparse
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HEAD_LOG_SIGMA, BOUND = -0.2, 4.
NUM_TEST = 100


def official_phase(args):
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, HERE)
  import official_train as ot  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  targs = ot.parse_args([f'--official_repo={args.official_repo}', f'--seed={args.seed}'])
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)
  with np.load(targs.data) as npz:
    train, test = npz['x_train'], npz['x_test'][:NUM_TEST]
  model = ot.build_model(targs, train.shape[1:])
  order = np.random.RandomState(args.seed).permutation(len(train))
  ot.initialise_actnorm(model, ot.to_tensor(train[order[:targs.batch_size]]))
  gen = torch.Generator().manual_seed(123)
  steps = [l for l in model.flow.layers if hasattr(l, 'coupling')]
  with torch.no_grad():
    for step in steps:
      out = step.coupling.NN_net.conv3
      for p, std in ((out.weight, 0.02), (out.bias, 0.02), (out.logs, 0.1)):
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    for prior in model.flow.c_prior.prior_list:
      enc = prior.prior_lstm
      # conv_embed -> a pass-through of the input channels (centre tap), so that the ConvLSTM
      # sees [l^(j-1), embed(r), 0, ...] as tfflows' first cell sees [l^(j-1), embed(r)]
      w = torch.zeros_like(enc.conv_embed.weight)
      centre = enc.conv_embed.kernel_size[0] // 2
      for i in range(enc.conv_embed.in_channels):
        w[i, i, centre, centre] = 1.
      enc.conv_embed.weight.copy_(w)
      enc.conv_embed.bias.zero_()
      # head: the mean channel keeps its random weights; the log-scale channel is the constant
      # HEAD_LOG_SIGMA (tfflows bounds log sigma softly, so only a constant transfers exactly)
      enc.conv_out1.weight[1].zero_()
      enc.conv_out1.bias[1] = HEAD_LOG_SIGMA
  # Midpoint dequantization: the official forward draws u with torch.rand.
  rand = torch.rand
  torch.rand = lambda *a, **k: torch.full(a[0] if len(a) == 1 else a, 0.5, **k)
  try:
    model.eval()
    with torch.no_grad():
      log_w = ot.log_weight(model, ot.to_tensor(test)).double().numpy()
  finally:
    torch.rand = rand
  weights = {}
  k_per_level = targs.steps_per_level
  for index, step in enumerate(steps):
    level, k = divmod(index, k_per_level)
    pre = f'level{level}_steps_stacked/'
    an, conv = step.actnormlayer, step.invert_1x1_layer
    net = step.coupling.NN_net
    c = an.bias.numel()
    n = c // 2
    idx = np.concatenate([np.arange(0, c, 2), np.arange(1, c, 2)])   # [shift, raw] halves
    def folded(layer):
      e = layer.actnorm.logs.detach().flatten().exp()
      kernel = (layer.weight.detach() * e[:, None, None, None]).permute(2, 3, 1, 0)
      return kernel.numpy(), (layer.actnorm.bias.detach().flatten() * e).numpy()
    kin, bin_ = folded(net.conv1)
    kmid, bmid = folded(net.conv2)
    out = net.conv3
    values = {
        '0_loc': an.bias.detach().flatten().numpy(),
        '1_log_scale': an.logs.detach().flatten().numpy(),
        '2_initialized': np.float32(1.),
        '3_lower': np.tril(conv.l.detach().numpy(), -1),
        '4_upper': np.triu(conv.u.detach().numpy(), 1),
        '5_log_abs_s': conv.log_s.detach().numpy(),
        '6_perm': conv.p.numpy(),
        '7_sign': conv.sign_s.numpy(),
        '8_conv_in.kernel': kin, '9_conv_in.bias': bin_,
        '10_conv_mid.kernel': kmid, '11_conv_mid.bias': bmid,
        '12_conv_out.kernel': out.weight.detach()[idx].permute(2, 3, 1, 0).numpy(),
        '13_conv_out.bias': out.bias.detach()[idx].numpy(),
        '14_conv_out.logs': out.logs.detach().flatten()[idx].numpy()}
    assert len(idx) == 2 * n
    for name, value in values.items():
      weights.setdefault(pre + name, [None] * k_per_level)[k] = np.asarray(value, np.float32)
  weights = {k: np.stack(v) for k, v in weights.items()}
  for level, prior in enumerate(model.flow.c_prior.prior_list):   # bottom-up, level 0 first
    enc, pre = prior.prior_lstm, f'prior{level}/'
    lstm, cin = enc.lstm, enc.conv_embed.in_channels
    for j in range(lstm.num_layers):
      w_ih = getattr(lstm, f'weight_ih_l{j}').detach()
      if j == 0:
        w_ih = w_ih[:, :cin]
      weights[pre + f'cell{j}/input_kernel'] = w_ih.permute(2, 3, 1, 0).numpy()
      weights[pre + f'cell{j}/recurrent_kernel'] = (
          getattr(lstm, f'weight_hh_l{j}').detach().permute(2, 3, 1, 0).numpy())
      weights[pre + f'cell{j}/bias'] = (getattr(lstm, f'bias_ih_l{j}')
                                        + getattr(lstm, f'bias_hh_l{j}')).detach().numpy()
    weights[pre + 'head/kernel'] = enc.conv_out1.weight.detach().permute(2, 3, 1, 0).numpy()
    weights[pre + 'head/bias'] = enc.conv_out1.bias.detach().numpy()
    if level < len(model.flow.c_prior.prior_list) - 1:   # the top prior's embed is never used
      for j, conv in enumerate((prior.z1_cond_network[0], prior.z1_cond_network[2])):
        weights[pre + f'embed{j}/kernel'] = conv.weight.detach().permute(2, 3, 1, 0).numpy()
        weights[pre + f'embed{j}/bias'] = conv.bias.detach().numpy()
  np.savez(args.npz, log_w=log_w, **weights)
  print(f'official: mean log w {log_w.mean():.6f} nats over {len(log_w)} test digits '
        f'({-log_w.mean() / (1024 * math.log(2.)):.6f} bits/dim)')


def tfflows_phase(args):
  sys.path.insert(0, ROOT)
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tfflows  # pylint: disable=import-outside-toplevel
  config = tfflows.FlowConfig(model='marscf', image_shape=(32, 32, 1), coupling='affine',
                              num_levels=3, steps_per_level=4, width=32, scale_fn='sigmoid',
                              conv1x1='lu', mar_hidden=16, mar_layers=2)
  model = tfflows.build_model(config)
  data = np.load(args.npz)
  targets = {v.path: v for v in model.variables if v.path.startswith('level')}
  for level, prior in enumerate(model.priors[::-1]):   # tfflows' priors are top-down
    pre = f'prior{level}/'
    for j, cell in enumerate(prior.lstm.cells):
      for name in ('input_kernel', 'recurrent_kernel', 'bias'):
        targets[pre + f'cell{j}/{name}'] = getattr(cell, name)
    targets[pre + 'head/kernel'], targets[pre + 'head/bias'] = prior.head.kernel, prior.head.bias
    if prior.embed is not None:
      for j, conv in enumerate(prior.embed.layers):
        targets[pre + f'embed{j}/kernel'], targets[pre + f'embed{j}/bias'] = conv.kernel, conv.bias
  missing = sorted(set(targets) ^ (set(data.files) - {'log_w'}))
  assert not missing, missing
  for name, v in targets.items():
    value = data[name].reshape(v.shape)
    if name.endswith('head/bias'):   # tfflows: log sigma = b tanh(raw / b)
      value = np.array([value[0], BOUND * math.atanh(value[1] / BOUND)], np.float32)
    v.assign(value)
  with np.load(os.path.join(ROOT, 'tfflows', 'data', 'mnist5k.npz')) as npz:
    test = npz['x_test'][:NUM_TEST]
  log_w = model.log_weight(tf.cast(test, tf.float32), training=False, midpoint=True).numpy()
  ref = data['log_w']
  diff = np.abs(log_w - ref)
  print(f'tfflows: mean log w {log_w.mean():.6f} nats; official {ref.mean():.6f}; largest '
        f'per-image difference {diff.max():.3e} nats = {diff.max() / (1024 * math.log(2.)):.3e} '
        f'bits/dim (relative {np.max(diff / np.abs(ref)):.2e})')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--phase', choices=['official', 'tfflows'], required=True)
  p.add_argument('--official_repo', default='')
  p.add_argument('--npz', required=True)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  (official_phase if args.phase == 'official' else tfflows_phase)(args)


if __name__ == '__main__':
  main()
