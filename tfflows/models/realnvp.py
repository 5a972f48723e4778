"""RealNVP (Dinh et al. 2017), as configured by LCMA (Das et al., appendix A).

    x -> ToUnitInterval -> logit(a + (1 - 2a) x), a = 0.05
    scale s < S:  3 affine couplings, checkerboard masks (alternating)
                  squeeze
                  3 affine couplings, channel masks (alternating)
                  [fixed permutation of the level's dimensions: LCMA / random splits]
                  factor out half of the channels
    last scale:   4 affine couplings, checkerboard masks

Couplings use log-scale = s_c * tanh(h) and residual conditioners (batch norm, weight norm)
with ``res_blocks`` blocks and width ``base_width * 2^s``. Priors are N(0, I).

Each group of alternating couplings is one loop over stacked weights (``bijectors.repeated``):
the couplings of a group are the same function of their weights and their mask parity, so the
parity is per-step data (0, 1, 0, ...) rather than looping over pairs, which would leave the odd
third coupling of a group of 3 outside the loop.

``config.split`` chooses the permutation before each split (``tfflows.split_permutations``):

    static        none: the split keeps channels [:c/2] of the squeezed tensor (RealNVP)
    random        a fixed random permutation of the level's h*w*c dimensions
    lcma          LCMA's ordered squeeze o unsqueeze from config.lcma_masks: keeps, in every
                  2x2 window and channel, the two dimensions of higher log-det contribution
    lcma_reverse  the same with the halves swapped: the high ones are factored out
    none          no factoring out at all (LCMA's pre-training model): one level, the scales
                  chained on the full tensor (the last scale at H/2^(S-1) x W/2^(S-1) x
                  C*4^(S-1)) and a single N(0, I) prior over it
"""

import bijectors as fb
from bijectors import multiscale, repeated
from tfflows import split_permutations
from tfflows.distributions import dequantization, priors
from tfflows.models.flow_model import FlowModel
from tfflows.nn import precision
from tfflows.nn.resnet import ResNetConditioner


def coupling(channels, mask, parity, width, config, name):
  out = fb.AffineCoupling.conditioner_channels(channels, mask)
  with precision.network_scope(config):
    net = ResNetConditioner(width, config.res_blocks, out, name=f'{name}_net')
  return fb.AffineCoupling(net, channels, mask=mask, parity=parity, scale_fn='tanh', name=name)


def couplings(shape, mask, count, width, config, name):
  """``count`` couplings of alternating parity (0, 1, 0, ...) on [H, W, C] = shape, as one loop
  over stacked weights whose per-step data is the parity (``bijectors.repeated``). Step k is
  named f'{name}{k}'."""
  parities = [k % 2 for k in range(count)]
  return repeated.Repeated(
      lambda k: coupling(shape[-1], mask, parities[k], width, config, f'{name}{k}'), count,
      event_shape=shape, remat=config.remat == 'step',
      step_kwargs={'parity': parities}, name=name)


def build_levels(config, split_permutation=None):
  """split_permutation(level_index, shape) -> a bijector applied before the split, or None.

  Without one, the permutation of config.split
  (``tfflows.split_permutations.split_permutation_fn``)."""
  if config.split == 'none':
    return build_unsplit_levels(config)
  if split_permutation is None:
    split_permutation = split_permutations.split_permutation_fn(config)
  h, w, c = config.image_shape
  levels = []
  for s in range(config.num_scales):
    width = config.base_width * 2 ** s
    bijs = [fb.ToUnitInterval(), fb.Logit(config.logit_alpha)] if s == 0 else []
    last = s == config.num_scales - 1
    bijs.append(couplings((h, w, c), 'checkerboard', 4 if last else 3, width, config,
                          f'scale{s}_checker'))
    if last:
      levels.append(multiscale.Level(fb.Chain(bijs, name=f'scale{s}')))
      break
    if h % 2 or w % 2:
      raise ValueError(f'{config.num_scales} scales need H and W divisible by '
                       f'{2 ** (config.num_scales - 1)}; image_shape is {config.image_shape}.')
    bijs.append(fb.Squeeze())
    h, w, c = h // 2, w // 2, 4 * c
    bijs.append(couplings((h, w, c), 'channel', 3, width, config, f'scale{s}_channel'))
    if split_permutation is not None:
      permutation = split_permutation(s, (h, w, c))
      if permutation is not None:
        bijs.append(permutation)
    levels.append(multiscale.Level(fb.Chain(bijs, name=f'scale{s}'), keep_channels=c // 2))
    c = c // 2
  return levels


def build_unsplit_levels(config):
  """split='none': the same scales with nothing factored out, as one level whose transform is
  a Chain of one Chain per scale (a split would follow every scale but the last)."""
  h, w, c = config.image_shape
  scales = []
  for s in range(config.num_scales):
    width = config.base_width * 2 ** s
    bijs = [fb.ToUnitInterval(), fb.Logit(config.logit_alpha)] if s == 0 else []
    last = s == config.num_scales - 1
    bijs.append(couplings((h, w, c), 'checkerboard', 4 if last else 3, width, config,
                          f'scale{s}_checker'))
    if not last:
      if h % 2 or w % 2:
        raise ValueError(f'{config.num_scales} scales need H and W divisible by '
                         f'{2 ** (config.num_scales - 1)}; image_shape is {config.image_shape}.')
      bijs.append(fb.Squeeze())
      h, w, c = h // 2, w // 2, 4 * c
      bijs.append(couplings((h, w, c), 'channel', 3, width, config, f'scale{s}_channel'))
    scales.append(fb.Chain(bijs, name=f'scale{s}'))
  return [multiscale.Level(fb.Chain(scales, name='unsplit'))]


def build(config, split_permutation=None):
  flow = multiscale.MultiScaleFlow(build_levels(config, split_permutation), config.image_shape)
  latent_priors = [priors.StandardNormalPrior(s, name=f'prior{k}')
                   for k, s in enumerate(flow.latent_shapes)]
  return FlowModel(config, flow, latent_priors, dequantization.UniformDequantizer())
