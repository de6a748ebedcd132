"""Pure normalization ops: validate, compute, return. No state, no triton import."""

from .batch_norm import batch_norm, frozen_batch_norm
from .group_norm import group_norm
from .instance_norm import instance_norm
from .layer_norm import layer_norm, layer_norm2d
from .local_response_norm import local_response_norm

__all__ = [
    "batch_norm",
    "frozen_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "local_response_norm",
]
