"""Keras layers used as coupling conditioners (channels-last, input [B, H, W, C])."""

from tfflows.nn.actnorm import ActNormLayer
from tfflows.nn.dense_block import DenseBlock, GatedConv1x1
from tfflows.nn.denseflow_net import DenseFlowConditioner
from tfflows.nn.flowpp_net import (GatedResidualAttentionNet, GatedResidualConv,
                                   GatedSelfAttention, concat_elu)
from tfflows.nn.glow_net import GlowConditioner
from tfflows.nn.nystrom import (NystromAttention, exact_softmax_attention, iterative_pinv,
                                nystrom_attention, segment_means)
from tfflows.nn.resnet import ResNetConditioner, WeightNormConv2D, weight_norm_scales
from tfflows.nn.zero_conv import ZeroConv2D, zero_conv1x1

__all__ = [
    'ActNormLayer', 'DenseBlock', 'DenseFlowConditioner', 'GatedConv1x1', 'GatedResidualAttentionNet',
    'GatedResidualConv', 'GatedSelfAttention', 'GlowConditioner', 'NystromAttention',
    'ResNetConditioner', 'WeightNormConv2D', 'ZeroConv2D', 'concat_elu',
    'exact_softmax_attention', 'iterative_pinv', 'nystrom_attention', 'segment_means',
    'weight_norm_scales', 'zero_conv1x1',
]
