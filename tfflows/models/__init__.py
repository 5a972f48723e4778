"""Model builders: ``build_model(config)`` returns a ``FlowModel`` for any known model name."""

from tfflows.config import MODELS, FlowConfig
from tfflows.models.flow_model import FlowModel


def build_model(config=None, **overrides):
  """Builds the model a FlowConfig (or keyword fields) describes.

  >>> model = build_model(FlowConfig(model='glow', num_levels=2, steps_per_level=2, width=16))
  """
  if config is None:
    config = FlowConfig(**overrides)
  elif isinstance(config, dict):
    config = FlowConfig.from_dict({**config, **overrides})
  elif overrides:
    config = config.replace(**overrides)
  builders = _builders()
  if config.model not in builders:
    raise ValueError(f'Unknown model {config.model!r}; known models: {", ".join(MODELS)}.')
  return builders[config.model](config)


def _builders():
  from tfflows.models import glow, realnvp  # pylint: disable=import-outside-toplevel
  builders = {'glow': glow.build, 'realnvp': realnvp.build}
  try:
    from tfflows.models import denseflow  # pylint: disable=import-outside-toplevel
    builders['denseflow'] = denseflow.build
  except ImportError:
    pass
  try:
    from tfflows.models import marscf  # pylint: disable=import-outside-toplevel
    builders['marscf'] = marscf.build
  except ImportError:
    pass
  return builders
