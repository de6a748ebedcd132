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
from .batch_renorm import (
    batch_renorm_backward,
    batch_renorm_forward,
    batch_renorm_update_running,
)
from .cross_iteration_batch_norm import (
    conv2d_forward,
    conv_moment_grads,
    cross_iteration_batch_norm_backward,
    cross_iteration_batch_norm_forward,
)
from .evonorm import (
    evonorm_b0_backward,
    evonorm_b0_forward,
    evonorm_s0_backward,
    evonorm_s0_forward,
)
from .filter_response_norm import (
    filter_response_norm_backward,
    filter_response_norm_forward,
    tlu_backward,
    tlu_forward,
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
from .moving_average_batch_norm import (
    moving_average_batch_norm_backward,
    moving_average_batch_norm_forward,
)
from .rms_norm import (
    rms_norm2d_backward,
    rms_norm2d_forward,
    rms_norm_backward,
    rms_norm_forward,
)
from .switchable_norm import switchable_norm_backward, switchable_norm_forward
from .weight_standardization import (
    centered_weight_backward,
    centered_weight_forward,
    standardized_weight_backward,
    standardized_weight_forward,
)

__all__ = [
    "batch_renorm_backward",
    "batch_renorm_forward",
    "batch_renorm_update_running",
    "evonorm_b0_backward",
    "evonorm_b0_forward",
    "evonorm_s0_backward",
    "evonorm_s0_forward",
    "filter_response_norm_backward",
    "filter_response_norm_forward",
    "tlu_backward",
    "tlu_forward",
    "conv2d_forward",
    "conv_moment_grads",
    "cross_iteration_batch_norm_backward",
    "cross_iteration_batch_norm_forward",
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
    "moving_average_batch_norm_backward",
    "moving_average_batch_norm_forward",
    "rms_norm2d_backward",
    "rms_norm2d_forward",
    "rms_norm_backward",
    "rms_norm_forward",
    "centered_weight_backward",
    "centered_weight_forward",
    "standardized_weight_backward",
    "standardized_weight_forward",
    "switchable_norm_backward",
    "switchable_norm_forward",
]
