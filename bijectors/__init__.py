"""Bijectors of tfflows (normalizing direction: forward maps data to latent)."""

from bijectors.actnorm import ActNorm
from bijectors.base import Chain, FlowBijector
from bijectors.conv1x1 import Conv1x1Params, InvertibleConv1x1
from bijectors.coupling import AffineCoupling, TanhScale
from bijectors.permute import ChannelPermutation, FlatPermutation, ReverseChannels, SwapHalves
from bijectors.preprocess import Logit, ToUnitInterval
from bijectors.squeeze import Squeeze, squeeze, unsqueeze

__all__ = [
    'ActNorm', 'AffineCoupling', 'Chain', 'ChannelPermutation', 'Conv1x1Params',
    'FlatPermutation', 'FlowBijector', 'InvertibleConv1x1', 'Logit', 'ReverseChannels',
    'Squeeze', 'SwapHalves', 'TanhScale', 'ToUnitInterval', 'squeeze', 'unsqueeze',
]
