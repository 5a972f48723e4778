"""tfflows: multi-scale normalizing flows for images on TensorFlow, Keras 3 and TFP.

    model = tfflows.build_model(tfflows.FlowConfig(model='glow', ...))
    model.log_prob(images)  /  model.bits_per_dim(images)  /  model.sample(16, temperature=0.8)
"""

from tfflows.config import MODELS, FlowConfig
from tfflows.models import FlowModel, build_model

__all__ = ['MODELS', 'FlowConfig', 'FlowModel', 'build_model']
__version__ = '0.1.0'
