"""Model configuration: one flat, serialisable record for every model tfflows builds.

The training program fills it from absl flags (``train/flags.py``); code can build one directly:

    config = tfflows.FlowConfig(model='glow', image_shape=(32, 32, 3), num_levels=3,
                                steps_per_level=32, width=512)

A SavedModel export writes it as JSON beside the model, so a served model can be rebuilt.
"""

import dataclasses
import json

MODELS = ('glow', 'realnvp', 'denseflow', 'marscf')
REMAT = ('none', 'step')
PRECISIONS = ('auto', 'float32', 'bfloat16', 'float16')
ATTENTION_FORMS = ('official', 'published')
# Fields that change how a model computes but not its weights: a run may resume or be evaluated
# with other values than it was trained with (train/run.py does not compare them).
RUNTIME_FIELDS = ('remat', 'conditioner_precision')
# Fields of earlier versions, accepted and ignored when a stored config is read: step_loop chose
# between looped and unrolled repeated steps, which now always run as one loop (the numbers are
# the same; a checkpoint of unrolled steps is refused on restore, naming its converter).
RETIRED_FIELDS = ('step_loop',)


@dataclasses.dataclass
class FlowConfig:
  """Architecture of a flow. Fields a model does not use are ignored by it."""

  model: str = 'glow'
  image_shape: tuple = (32, 32, 3)

  # Glow and mAR-SCF: levels of [squeeze, K steps, split].
  num_levels: int = 3
  steps_per_level: int = 32
  width: int = 512
  coupling: str = 'affine'          # affine | mixlogcdf (mAR-SCF)
  scale_fn: str = 'sigmoid'         # sigmoid (Glow) | exp_tanh (DenseFlow) | tanh (RealNVP)
  conv1x1: str = 'lu'               # lu | plain
  split_prior: str = 'learned'      # learned (Glow's conv prior) | standard (N(0, I))

  # RealNVP / LCMA.
  num_scales: int = 3
  res_blocks: int = 8
  base_width: int = 32
  logit_alpha: float = 0.05
  split: str = 'static'             # static | random | lcma | lcma_reverse | none (LCMA phase 1)
  lcma_masks: str = ''              # path of the permutation file written by lcma_analyze

  # DenseFlow.
  block_conf: tuple = (6, 4, 1)
  layers_conf: tuple = (5, 6, 20)
  layer_mid_channels: tuple = (48, 48, 48)
  growth_rate: int = 10
  dense_layers: int = 7
  dense_growth: int = 64
  num_landmarks: int = 4
  pinv_iterations: int = 6
  attention: str = 'official'       # DenseFlow attention: official (the authors' code) | published
  dequantization: str = 'uniform'   # uniform | variational
  conditioner_precision: str = 'auto'  # the networks: auto|float32|bfloat16|float16

  # mAR-SCF prior and MixLogCDF couplings.
  mar_hidden: int = 32
  mar_layers: int = 3
  num_components: int = 32
  dropout: float = 0.2
  attention_heads: int = 4
  coupling_blocks: int = 10         # MixLogCDF conditioner: gated conv + attention blocks

  # Repeated flow steps (bijectors.repeated).
  remat: str = 'none'               # none | step: recompute each step's activations in backprop

  def __post_init__(self):
    for name in ('image_shape', 'block_conf', 'layers_conf', 'layer_mid_channels'):
      setattr(self, name, tuple(int(v) for v in getattr(self, name)))
    self.validate()

  def validate(self):
    """Raises ValueError naming the first inconsistent field."""
    if self.model not in MODELS:
      raise ValueError(f'Unknown model {self.model!r}; known models: {", ".join(MODELS)}.')
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ValueError(f'image_shape must be (H, W, C) with positive sizes, got {self.image_shape}.')
    _one_of('coupling', self.coupling, ('affine', 'mixlogcdf'))
    _one_of('scale_fn', self.scale_fn, ('sigmoid', 'exp_tanh', 'tanh'))
    _one_of('conv1x1', self.conv1x1, ('lu', 'plain'))
    _one_of('split_prior', self.split_prior, ('learned', 'standard'))
    _one_of('split', self.split, ('static', 'random', 'lcma', 'lcma_reverse', 'none'))
    _one_of('dequantization', self.dequantization, ('uniform', 'variational'))
    _one_of('attention', self.attention, ATTENTION_FORMS)
    _one_of('remat', self.remat, REMAT)
    _one_of('conditioner_precision', self.conditioner_precision, PRECISIONS)
    if self.split in ('lcma', 'lcma_reverse') and not self.lcma_masks:
      raise ValueError(f'split={self.split} needs lcma_masks: the file written by '
                       '--mode=lcma_analyze.')
    for name in _POSITIVE:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name}={value!r} must be a positive integer.')
    if min(self.layer_mid_channels, default=1) < 1:
      raise ValueError(f'layer_mid_channels must be positive, got {self.layer_mid_channels}.')
    if not len(self.block_conf) == len(self.layers_conf) == len(self.layer_mid_channels):
      raise ValueError('block_conf, layers_conf and layer_mid_channels must have one entry per '
                       f'block, got {self.block_conf}, {self.layers_conf}, '
                       f'{self.layer_mid_channels}.')

  @property
  def num_dims(self):
    """D = H * W * C of an image: the divisor of bits/dim."""
    h, w, c = self.image_shape
    return h * w * c

  def to_dict(self):
    return dataclasses.asdict(self)

  def to_json(self):
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values):
    known = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k not in RETIRED_FIELDS}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown config fields: {", ".join(unknown)}.')
    return cls(**values)

  @classmethod
  def from_json(cls, text):
    return cls.from_dict(json.loads(text))

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


# Sizes a model cannot be built (or is a flow with no steps) with a value below 1.
_POSITIVE = ('num_levels', 'steps_per_level', 'width', 'num_scales', 'base_width',
             'dense_growth', 'mar_hidden', 'num_components', 'attention_heads')


def _one_of(name, value, allowed):
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of {", ".join(allowed)}.')
