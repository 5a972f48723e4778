"""Glow (Kingma & Dhariwal 2018).

    x -> ToUnitInterval -> [ squeeze -> K x step -> split ]  x L levels (no split at the last)
    step = ActNorm -> invertible 1x1 conv (LU) -> affine coupling, scale = sigmoid(h + 2)

The K steps of a level run as one loop over stacked weights (``bijectors.repeated``;
config.remat='step' recomputes them in the backward pass).

The split keeps the first half of the channels; the factored half has Glow's learned prior
N(mu(r), sigma(r)) from a zero-initialised conv over the kept half r. The top latent has a
learned per-channel Gaussian. Paper size for CIFAR-10: L = 3, K = 32, width 512.

``config.split`` (``tfflows.split_permutations``): static (Glow's split), random (a fixed random permutation
of the level's dimensions before the split) or lcma / lcma_reverse (the permutations of
config.lcma_masks, inserted after the level's last step, right before the split). Glow's split
shapes equal RealNVP's with num_scales = num_levels, so a masks file from the analysis of a
no-split RealNVP applies; Glow itself cannot be analysed (its 1x1 convolutions mix dimensions,
so the per-dimension log-det is undefined). split='none' is not supported on Glow.
"""

import bijectors as fb
from bijectors import multiscale, repeated
from tfflows import split_permutations
from tfflows.distributions import dequantization
from tfflows.distributions.split_priors import split_priors
from tfflows.models.flow_model import FlowModel
from tfflows.nn import precision
from tfflows.nn.glow_net import GlowConditioner


def flow_step(channels, width, scale_fn='sigmoid', conv1x1='lu', conditioner=None, name='step',
              network_policy=None):
  """ActNorm -> 1x1 conv -> affine coupling (channel mask).

  network_policy: the Keras dtype policy name the default conditioner is created under (None:
  the current policy; ``tfflows.nn.precision``)."""
  out = fb.AffineCoupling.conditioner_channels(channels, 'channel')
  with precision.dtype_policy_scope(network_policy):
    conditioner = conditioner or GlowConditioner(width, out, name=f'{name}_net')
  return [fb.ActNorm(channels, name=f'{name}_actnorm'),
          fb.InvertibleConv1x1(channels, parameterization=conv1x1, name=f'{name}_conv1x1'),
          fb.AffineCoupling(conditioner, channels, mask='channel', scale_fn=scale_fn,
                            name=f'{name}_coupling')]


def build_levels(config, step_fn=None, split_permutation=None):
  """Levels of squeeze + K steps (+ split), and the latent priors (top-down).

  split_permutation(level_index, shape) -> a bijector applied right before the split, or None;
  by default the permutation of config.split
  (``tfflows.split_permutations.split_permutation_fn``)."""
  if config.split == 'none':
    raise ValueError("split='none' (no factoring out) exists for LCMA's RealNVP pre-training; "
                     'Glow supports split=static|random|lcma|lcma_reverse.')
  if split_permutation is None:
    split_permutation = split_permutations.split_permutation_fn(config)
  step_fn = step_fn or (lambda c, name: flow_step(
      c, config.width, config.scale_fn, config.conv1x1, name=name,
      network_policy=precision.network_policy_name(config.conditioner_precision)))
  h, w, c = config.image_shape
  levels = []
  for i in range(config.num_levels):
    if h % 2 or w % 2:
      raise ValueError(f'{config.num_levels} levels need H and W divisible by '
                       f'{2 ** config.num_levels}; image_shape is {config.image_shape}.')
    h, w, c = h // 2, w // 2, c * 4
    bijs = [fb.ToUnitInterval()] if i == 0 else []
    bijs.append(fb.Squeeze())
    bijs.append(repeated_steps(step_fn, config, (h, w, c), f'level{i}'))
    last = i == config.num_levels - 1
    if not last and split_permutation is not None:
      permutation = split_permutation(i, (h, w, c))
      if permutation is not None:
        bijs.append(permutation)
    keep = None if last else c // 2
    levels.append(multiscale.Level(fb.Chain(bijs, name=f'level{i}'), keep_channels=keep))
    if not last:
      c = keep
  return levels


def repeated_steps(step_fn, config, shape, name):
  """The K = config.steps_per_level steps of a level on [H, W, C] = shape: one loop over stacked
  weights (``bijectors.repeated``)."""
  def make_step(k):
    return fb.Chain(step_fn(shape[-1], f'{name}_step{k}'), name=f'{name}_step{k}')
  return repeated.Repeated(make_step, config.steps_per_level, event_shape=shape,
                           remat=config.remat == 'step', name=f'{name}_steps')


def build(config):
  flow = multiscale.MultiScaleFlow(build_levels(config), config.image_shape)
  return FlowModel(config, flow, split_priors(flow.latent_shapes, config.split_prior),
                   dequantization.UniformDequantizer())
