"""Float64 NumPy forward and backward of the classic normalization layers, from the math.

The test oracle and teaching code of normlab: no torch import anywhere in this package.
Each method has ``<method>_forward(...) -> (y, cache)`` and
``<method>_backward(dy, cache) -> dict`` of gradients ("dx", and "dweight"/"dbias" where
the layer has them; None when the parameter was None). Input layout is (N, C, *spatial).
"""

from .batch_norm import (
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_update_running,
    frozen_batch_norm_backward,
    frozen_batch_norm_forward,
)
from .group_norm import group_norm_backward, group_norm_forward
from .instance_norm import (
    instance_norm_backward,
    instance_norm_forward,
    instance_norm_update_running,
)
from .layer_norm import (
    layer_norm2d_backward,
    layer_norm2d_forward,
    layer_norm_backward,
    layer_norm_forward,
)
from .local_response_norm import local_response_norm_backward, local_response_norm_forward

__all__ = [
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_update_running",
    "frozen_batch_norm_backward",
    "frozen_batch_norm_forward",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward",
    "instance_norm_update_running",
    "layer_norm2d_backward",
    "layer_norm2d_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "local_response_norm_backward",
    "local_response_norm_forward",
]
