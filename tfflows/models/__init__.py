"""Model builders: ``build_model(config)`` returns a ``FlowModel`` for any known model name.

Precision: the networks (coupling conditioners; DenseFlow's cross-unit and dequantization
networks) compute in ``config.conditioner_precision`` or in the compute dtype of a global mixed
Keras policy (``tfflows.nn.precision``; the two must agree), for every family; the flow,
log-dets, priors and every variable stay float32. 'auto' picks bfloat16 on hardware that computes
it natively for the families in ``AUTO_PRECISION_FAMILIES`` (measured for DenseFlow), float32 for
the others. ``model.network_precision`` names the dtype the networks compute in.
"""

from absl import logging

import keras

from tfflows.config import MODELS, FlowConfig
from tfflows.models.flow_model import FlowModel
from tfflows.nn import precision

AUTO_PRECISION_FAMILIES = ('denseflow',)


def build_model(config=None, **overrides):
  """Builds the model a FlowConfig (or keyword fields) describes.

  >>> model = build_model(FlowConfig(model='glow', num_levels=2, steps_per_level=2, width=16))

  Under a global mixed Keras policy ('mixed_bfloat16', 'mixed_float16') only the networks are
  created under it (see the module doc). Raises ValueError for an unknown model, an inconsistent
  config, or a conditioner_precision that contradicts the global mixed policy.
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
  resolved = precision.resolve_precision(config.conditioner_precision,
                                         use_hardware=config.model in AUTO_PRECISION_FAMILIES)
  policy = keras.config.dtype_policy().name
  with precision.flow_policy_scope():
    # The builders see the resolved precision; the model keeps the config it was asked for
    # ('auto' resolves again wherever the config is rebuilt).
    model = builders[config.model](config.replace(conditioner_precision=resolved))
    model.network_precision = keras.dtype_policies.get(
        precision.POLICIES[resolved] or keras.config.dtype_policy()).compute_dtype
  model.config = config
  logging.info('%s: networks compute in %s (conditioner_precision=%s, Keras policy %s)',
               config.model, model.network_precision, config.conditioner_precision, policy)
  return model


FlowModel.builder = staticmethod(build_model)  # what FlowModel.from_config rebuilds with


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
