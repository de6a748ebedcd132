"""Pure normalization ops: validate, compute, return. No state, no triton import."""

from .batch_norm import batch_norm, frozen_batch_norm
from .batch_renorm import batch_renorm, batch_renorm_limits
from .cross_iteration_batch_norm import cross_iteration_batch_norm
from .evonorm import evonorm_b0, evonorm_s0
from .filter_response_norm import filter_response_norm, frn_tlu, tlu
from .group_norm import group_norm
from .instance_norm import instance_norm
from .layer_norm import layer_norm, layer_norm2d
from .local_response_norm import local_response_norm
from .moving_average_batch_norm import moving_average_batch_norm
from .rms_norm import rms_norm, rms_norm2d
from .switchable_norm import switchable_norm
from .weight_standardization import centered_weight, standardized_weight

__all__ = [
    "batch_renorm",
    "batch_renorm_limits",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "frn_tlu",
    "tlu",
    "batch_norm",
    "cross_iteration_batch_norm",
    "frozen_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "local_response_norm",
    "moving_average_batch_norm",
    "rms_norm",
    "rms_norm2d",
    "switchable_norm",
    "centered_weight",
    "standardized_weight",
]
