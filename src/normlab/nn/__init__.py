"""normlab's normalization modules: torch-compatible constructors and state_dicts."""

from .batch_norm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .conv import CenteredConv2d, WSConv2d
from .cross_iteration_batch_norm import CrossIterationBatchNorm2d
from .evonorm import EvoNormB0_2d, EvoNormS0_2d
from .filter_response_norm import (
    TLU,
    FilterResponseNorm1d,
    FilterResponseNorm2d,
    FilterResponseNorm3d,
)
from .group_norm import GroupNorm
from .instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, LayerNorm2d
from .local_response_norm import LocalResponseNorm
from .moving_average_batch_norm import (
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
)
from .rms_norm import RMSNorm, RMSNorm2d
from .switchable_norm import (
    SwitchableNorm1d,
    SwitchableNorm2d,
    SwitchableNorm3d,
    load_reference_switchnorm_state_dict,
)

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "EvoNormB0_2d",
    "EvoNormS0_2d",
    "FilterResponseNorm1d",
    "FilterResponseNorm2d",
    "FilterResponseNorm3d",
    "TLU",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "CrossIterationBatchNorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "LocalResponseNorm",
    "MovingAverageBatchNorm1d",
    "MovingAverageBatchNorm2d",
    "MovingAverageBatchNorm3d",
    "RMSNorm",
    "RMSNorm2d",
    "CenteredConv2d",
    "WSConv2d",
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
    "load_reference_switchnorm_state_dict",
]
