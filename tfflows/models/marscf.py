"""mAR-SCF: normalizing flows with multi-scale autoregressive priors (Bhattacharyya et al. 2020).

    x -> ToUnitInterval (x/256 - 0.5) -> [ squeeze -> K x step -> split ] x L levels
    step = ActNorm -> invertible 1x1 conv (LU) -> coupling
      coupling='affine':    Glow's affine split coupling, scale = sigmoid(h + 2),
                            conditioner conv3x3 -> conv1x1 -> zero conv3x3 (GlowConditioner)
      coupling='mixlogcdf': Flow++'s MixLogCDF coupling (``num_components`` logistics),
                            conditioner = gated residual convs + multi-head self-attention with
                            dropout (GatedResidualAttentionNet, ``coupling_blocks`` blocks)

At split level i (1-based, i < L) the output h_i of the level splits into the half that goes on,
r_i, and the factored-out half l_i. The prior over the latent structure is

    p(l_1, ..., l_(L-1), h_L) = p_L(h_L) * prod_(i<L) p_i(l_i | r_i)

where every factor is an mAR prior (``tfflows.distributions.mar_prior.MARPrior``): a
convolutional LSTM over the channels of l_i, conditioned on an embedding of r_i, with kernel
5x5 and dilation 2 at level 1, 5x5 at level 2 and 3x3 above; p_L is an unconditional mAR prior
over the channels of the last level.

MARPS sampling is ``tfflows.distributions.joint.sample_top_down`` with these priors: the last
level first (its channels one after another), then for each level top-down the flow inverse of
the level above (parallel over pixels and channels) followed by the channels of l_i one after
another with the LSTM state carried. With C image channels the number of sequential prior
steps is (3 * 2^L - 2) * C (``marps_num_steps``; 66 for 32x32x3 with L = 3, 138 for 64x64x3
with L = 4); the L level inverses in between are parallel and are not counted, as in the paper.

Paper sizes: affine K = 32, width 512; MixLogCDF K = 4, width 96, 32 components, dropout 0.2,
10 conditioner blocks (the authors' code); L = 3 at 32x32 and L = 4 at 64x64; mAR prior with a
3-layer ConvLSTM of hidden size 32.
"""

import keras

import bijectors as fb
from bijectors import mixlogcdf
from bijectors import multiscale
from tfflows.distributions import dequantization
from tfflows.distributions.mar_prior import MARPrior, marps_num_steps
from tfflows.models import glow
from tfflows.models.flow_model import FlowModel
from tfflows.nn import precision
from tfflows.nn.flowpp_net import GatedResidualAttentionNet

EMBED_CHANNELS = 4


def mixlogcdf_step(channels, config, name='step'):
  """ActNorm -> LU 1x1 conv -> MixLogCDF coupling with a gated attention conditioner."""
  out = mixlogcdf.MixLogCDFCoupling.conditioner_channels(channels, config.num_components)
  with precision.network_scope(config):
    net = GatedResidualAttentionNet(out, width=config.width, num_blocks=config.coupling_blocks,
                                    num_heads=config.attention_heads, dropout=config.dropout,
                                    name=f'{name}_net')
  return [fb.ActNorm(channels, name=f'{name}_actnorm'),
          fb.InvertibleConv1x1(channels, parameterization=config.conv1x1,
                               name=f'{name}_conv1x1'),
          mixlogcdf.MixLogCDFCoupling(net, channels, num_components=config.num_components,
                                      name=f'{name}_coupling')]


def step_fn(config):
  """The flow step of the configured coupling, as ``glow.build_levels`` expects it."""
  if config.coupling == 'mixlogcdf':
    return lambda c, name: mixlogcdf_step(c, config, name)
  return lambda c, name: glow.flow_step(
      c, config.width, config.scale_fn, config.conv1x1, name=name,
      network_policy=precision.network_policy_name(config.conditioner_precision))


def prior_kernel(level):
  """(kernel_size, dilation) of the mAR prior at 0-based level index (bottom-up)."""
  if level == 0:
    return 5, 2
  if level == 1:
    return 5, 1
  return 3, 1


def mar_priors(flow, config):
  """One MARPrior per latent, top-down: unconditional on top, conditioned on r_i below."""
  num = len(flow.latent_shapes)
  priors = []
  for k, (h, w, c) in enumerate(flow.latent_shapes):
    level = num - 1 - k  # bottom-up index of the level this latent leaves at
    kernel, dilation = prior_kernel(level)
    keep = flow.levels[level].keep_channels
    priors.append(MARPrior(c, h, w, context_channels=keep, hidden=config.mar_hidden,
                           num_layers=config.mar_layers, kernel_size=kernel, dilation=dilation,
                           embed_channels=EMBED_CHANNELS,
                           name='prior_top' if keep is None else f'prior_level{level}'))
  return priors


@keras.saving.register_keras_serializable(package='tfflows')
class MARSCF(FlowModel):
  """A FlowModel with mAR priors; MARPS sampling is the inherited top-down ``sample``."""

  @property
  def num_sequential_sampling_steps(self):
    """Sequential autoregressive steps of one MARPS draw: the channels of every prior."""
    return sum(p.num_sequential_steps for p in self.priors)

  @property
  def expected_sequential_sampling_steps(self):
    """(3 * 2^L - 2) * C, the paper's count (seed Lemma A.1) for this configuration."""
    return marps_num_steps(self.config.num_levels, self.image_shape[-1])


def build(config):
  """An mAR-SCF model (``MARSCF``) for a FlowConfig with model='marscf'."""
  if config.coupling == 'mixlogcdf' and config.width % config.attention_heads:
    raise ValueError(f'width={config.width} must be divisible by attention_heads='
                     f'{config.attention_heads} for the MixLogCDF conditioner.')
  flow = multiscale.MultiScaleFlow(glow.build_levels(config, step_fn(config)),
                                   config.image_shape)
  model = MARSCF(config, flow, mar_priors(flow, config), dequantization.UniformDequantizer())
  if model.num_sequential_sampling_steps != model.expected_sequential_sampling_steps:
    raise AssertionError('MARPS step count disagrees with (3 * 2^L - 2) * C: '
                         f'{model.num_sequential_sampling_steps} vs '
                         f'{model.expected_sequential_sampling_steps}.')
  return model
