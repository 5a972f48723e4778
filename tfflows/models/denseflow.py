"""DenseFlow (Grcic, Grubisic & Segvic, NeurIPS 2021): densely connected normalizing flows.

    images {0..255} -> dequantization (variational q(u|x), or uniform) -> x + u in [0, 256)
    -> ToUnitInterval (v / 256 - 0.5) -> squeeze
    -> dense block 1 -> [squeeze, keep half, factor out half]
    -> dense block 2 -> [squeeze, keep half, factor out half] -> ... -> dense block B
    -> learned diagonal Gaussian (a mean and log-scale per channel)

Dense block b (``bijectors.cross_unit.CrossUnitBlock``): ``block_conf[b]`` units with cross-unit
coupling before every unit but the first (noise growth ``growth_rate`` channels each); a unit is
``layers_conf[b]`` steps of

    ActNorm -> invertible 1x1 conv (orthogonal init, 'plain') -> affine coupling
    (conditions on ceil(C/2) channels, y = shift + exp(2 tanh(s/2)) x) -> swap halves

whose coupling network is ``tfflows.nn.DenseFlowConditioner`` with width
``layer_mid_channels[b]``, ``dense_layers`` x ``dense_growth`` dense block and Nystrom attention
(``num_landmarks``, ``pinv_iterations``). Factored-out halves get N(0, I)
(``split_prior='standard'``, the paper) or Glow's learned conv prior (``'learned'``).

Levels of the ``MultiScaleFlow`` (DF-74-10 at 32x32x3; shapes [H, W, C]):

    level 0: ToUnitInterval, squeeze (16,16,12), block 1 (6 units x 5 steps, 12 -> 62 channels,
             5 noise tensors (16,16,10)), squeeze (8,8,248)           keep 124, factor out 124
    level 1: block 2 (4 x 6 steps, 124 -> 154, 3 noise tensors (8,8,10)), squeeze (4,4,616)
                                                                     keep 308, factor out 308
    level 2: block 3 (1 unit x 20 steps on (4,4,308), no noise)       the top latent

The noise adds 14,720 dimensions at 32x32 (58,880 at 64x64); bits/dim counts image dimensions
only.

Precision: ``conditioner_precision`` (``tfflows.nn.precision``): 'auto' (the default) makes the
networks -- coupling conditioners, cross-unit nets g_i, the dequantizer's context and coupling
nets -- compute in bfloat16 where the hardware does so natively (NVIDIA compute capability >= 8.0,
CPUs with AVX512-BF16 or AMX running oneDNN kernels) and in float32 elsewhere; 'bfloat16', 'float16' (GPUs) or
'float32' force one (Keras mixed policies: float32 variables). Network outputs are cast to
float32 before use, so the flow itself, every log-det, the noise densities and the priors stay
float32, and the inverse stays exact (it recomputes the same network outputs from the same
float32 inputs). A global mixed Keras policy asks for the same (``tfflows.models``). The build
logs the resolved precision; ``model.network_precision`` holds it.

Steps: the steps of a unit run as one loop over stacked weights (``bijectors.repeated``), with
``remat='step'`` recomputing each step's activations in the backward pass. Units differ in
their channel counts, so each is its own loop.
``parameter_count(config)`` gives the trainable-parameter breakdown analytically;
DF-74-10 with variational dequantization has 130,647,294, the official model's count.
"""

import math

import bijectors as fb
from bijectors import cross_unit, multiscale, repeated
from tfflows.distributions import dequantization, variational_dequantization
from tfflows.distributions.split_priors import split_priors
from tfflows.models.flow_model import FlowModel
from tfflows.nn.denseflow_net import DenseFlowConditioner
from tfflows.nn import precision


def network_policy(config):
  """The Keras dtype-policy scope of ``config.conditioner_precision`` (resolved for this
  machine) for creating and building networks (no change for float32)."""
  return precision.network_scope(config)


def flow_step(channels, width, config, name, spatial=None):
  """ActNorm -> 1x1 conv ('plain') -> affine coupling (exp(2 tanh(s/2))) -> swap halves.

  spatial: (H, W) to build the coupling network now (under ``config``'s network precision)."""
  if channels < 2:
    raise ValueError(f'{name}: a DenseFlow step needs at least 2 channels, got {channels}.')
  with network_policy(config):
    net = DenseFlowConditioner(fb.AffineCoupling.conditioner_channels(channels, 'channel'),
                               width=width, dense_layers=config.dense_layers,
                               dense_growth=config.dense_growth,
                               num_landmarks=config.num_landmarks,
                               pinv_iterations=config.pinv_iterations,
                               attention=config.attention, name=f'{name}_net')
    if spatial is not None:
      net.build((None,) + tuple(spatial) + (math.ceil(channels / 2),))
  return [fb.ActNorm(channels, name=f'{name}_actnorm'),
          fb.InvertibleConv1x1(channels, parameterization='plain', name=f'{name}_conv1x1'),
          fb.AffineCoupling(net, channels, mask='channel', scale_fn='exp_tanh',
                            name=f'{name}_coupling'),
          fb.SwapHalves(name=f'{name}_swap')]


def dense_block(index, channels, spatial, config):
  """Dense block ``index`` on [H, W, channels] inputs: a ``CrossUnitBlock``."""
  num_units, num_steps = config.block_conf[index], config.layers_conf[index]
  width = config.layer_mid_channels[index]
  units = []
  for u in range(num_units):
    c = channels + u * config.growth_rate
    name = f'block{index}_unit{u}'

    def make_step(s, c=c, name=name):
      return fb.Chain(flow_step(c, width, config, f'{name}_step{s}', spatial),
                      name=f'{name}_step{s}')

    units.append(repeated.Repeated(make_step, num_steps, event_shape=tuple(spatial) + (c,),
                                   remat=config.remat == 'step',
                                   name=name))
  with network_policy(config):
    block = cross_unit.CrossUnitBlock(units, channels, config.growth_rate, spatial,
                                      name=f'block{index}')
    for i, net in enumerate(block.nets, start=1):
      net.build((None,) + tuple(spatial) + (block.context_channels(i),))
  return block


def validate(config):
  """Raises ValueError naming the first DenseFlow-specific inconsistency of ``config``."""
  h, w, _ = config.image_shape
  num_blocks = len(config.block_conf)
  if num_blocks < 1:
    raise ValueError('DenseFlow needs at least one dense block (block_conf).')
  if min(config.block_conf) < 1 or min(config.layers_conf) < 1:
    raise ValueError(f'block_conf and layers_conf must be positive, got {config.block_conf} '
                     f'and {config.layers_conf}.')
  if min(config.layer_mid_channels) < 1:
    raise ValueError(f'layer_mid_channels must be positive, got {config.layer_mid_channels}.')
  precision.resolve_precision(config.conditioner_precision)  # a clear error for a bad name
  if config.growth_rate < 1 and max(config.block_conf) > 1:
    raise ValueError(f'growth_rate must be >= 1 when a block has several units, '
                     f'got {config.growth_rate}.')
  factor = 2 ** num_blocks
  if h % factor or w % factor:
    raise ValueError(f'{num_blocks} dense blocks squeeze {num_blocks} times: H and W must be '
                     f'divisible by {factor}; image_shape is {config.image_shape}.')
  for b in range(num_blocks):
    tokens = (h // 2 ** (b + 1)) * (w // 2 ** (b + 1))
    if tokens % config.num_landmarks:
      raise ValueError(f'block {b} attends over {tokens} pixels, which num_landmarks='
                       f'{config.num_landmarks} does not divide.')


def build_levels(config):
  """The levels of the multi-scale flow (see the module docstring)."""
  validate(config)
  h, w, c = config.image_shape
  h, w, c = h // 2, w // 2, 4 * c
  levels = []
  num_blocks = len(config.block_conf)
  for b in range(num_blocks):
    bijs = [fb.ToUnitInterval(), fb.Squeeze()] if b == 0 else []
    block = dense_block(b, c, (h, w), config)
    bijs.append(block)
    c = block.out_channels
    last = b == num_blocks - 1
    keep = None
    if not last:
      bijs.append(fb.Squeeze(name=f'transition{b}_squeeze'))
      h, w, c = h // 2, w // 2, 4 * c
      keep = c // 2
    chain = cross_unit.AugmentedChain(bijs, name=f'level{b}')
    levels.append(multiscale.Level(chain, keep_channels=keep))
    if keep is not None:
      c = keep
  return levels


def build_dequantizer(config):
  if config.dequantization == 'variational':
    return variational_dequantization.VariationalDequantizer(
        config.image_shape,
        network_policy=precision.network_policy_name(config.conditioner_precision),
        name='dequantizer')
  return dequantization.UniformDequantizer(name='dequantizer')


def build(config):
  """A DenseFlow model (``tfflows.build_model`` resolves the precision and sets
  ``model.network_precision``)."""
  flow = multiscale.MultiScaleFlow(build_levels(config), config.image_shape)
  return FlowModel(config, flow, split_priors(flow.latent_shapes, config.split_prior),
                   build_dequantizer(config))


# -- parameter count ------------------------------------------------------------------------
def _conditioner_params(c_in, c_out, width, dense_layers, dense_growth):
  """Trainable parameters of ``DenseFlowConditioner`` (batch-norm statistics excluded)."""
  embed = width // 2
  total = c_in * width + width                                   # conv_in
  c = width
  for _ in range(dense_layers):                                  # dense block
    total += c * c + c + 9 * c * dense_growth + dense_growth
    c += dense_growth
  total += c * 3 * width + 3 * width                             # gated conv
  total += 3 * (width * embed + embed) + embed * width + width   # attention q, k, v, out
  total += 2 * 2 * width                                         # batch norm gamma, beta
  total += 2 * width * width                                     # conv_mid (no bias)
  total += width * c_out + c_out                                 # conv_out
  return total


def _dense_block_params(c, depth, growth):
  total = 0
  for _ in range(depth):
    total += c * c + c + 9 * c * growth + growth
    c += growth
  return total, c


def _dequantizer_params(image_channels, num_steps=4, context=64, context_depth=4,
                        context_growth=16, mid=64, depth=4, growth=64):
  c4 = 4 * image_channels
  ctx, c = _dense_block_params(image_channels, context_depth, context_growth)
  ctx += c * 3 * context + 3 * context + 4 * context * context + context
  block, c = _dense_block_params(context, context_depth, context_growth)
  ctx += block + c * 3 * context + 3 * context
  block, c = _dense_block_params(mid, depth, growth)
  net = (c4 // 2 + context) * mid + mid + block + c * 3 * mid + 3 * mid + mid * c4 + c4
  return {'context_net': ctx, 'coupling_nets': num_steps * net,
          'conv1x1': (num_steps + 1) * c4 * c4, 'base': 2 * c4}


def parameter_count(config):
  """Trainable parameters of ``build(config)`` by component, computed without building it.

  Returns a dict: steps_actnorm, steps_conv1x1, coupling_nets, cross_unit_nets, priors,
  dequantizer (0 for uniform) and total.
  """
  validate(config)
  h, w, c = config.image_shape
  h, w, c = h // 2, w // 2, 4 * c
  counts = dict(steps_actnorm=0, steps_conv1x1=0, coupling_nets=0, cross_unit_nets=0)
  g = config.growth_rate
  num_blocks = len(config.block_conf)
  for b in range(num_blocks):
    width = config.layer_mid_channels[b]
    for u in range(config.block_conf[b]):
      cu = c + u * g
      if u > 0:
        k = cross_unit.context_channels(c, g, u)
        counts['cross_unit_nets'] += 9 * k * 4 * k + 4 * k + 4 * k * 2 * g + 2 * g
      steps = config.layers_conf[b]
      counts['steps_actnorm'] += steps * 2 * cu
      counts['steps_conv1x1'] += steps * cu * cu
      counts['coupling_nets'] += steps * _conditioner_params(
          math.ceil(cu / 2), 2 * (cu // 2), width, config.dense_layers, config.dense_growth)
    c += (config.block_conf[b] - 1) * g
    if b < num_blocks - 1:
      h, w, c = h // 2, w // 2, 4 * c
      kept = c // 2
      if config.split_prior == 'learned':   # zero conv 3x3: kernel, bias, logs
        counts.setdefault('split_priors', 0)
        counts['split_priors'] += 9 * kept * 2 * (c - kept) + 2 * 2 * (c - kept)
      c = kept
  counts['top_prior'] = 2 * c
  counts['dequantizer'] = 0
  if config.dequantization == 'variational':
    counts['dequantizer'] = sum(_dequantizer_params(config.image_shape[-1]).values())
  counts['total'] = sum(counts.values())
  return counts
