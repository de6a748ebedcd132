"""Layer-level bad input: a non-integer count or a non-tensor input gets one clear error.

``num_features=2.5`` or ``'8'`` (and the other counts: groups, channels, normalized
shapes, window sizes) raise a TypeError naming the argument, instead of a rounded layer
or a raw torch error; a NumPy array or a list given to a layer or functional raises a
TypeError that says to convert it, in every normlab layer and functional.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import normlab.functional as NF
import normlab.nn as nnl

#: name -> constructor taking the count under test
COUNT_CONSTRUCTORS = {
    "BatchNorm1d": ("num_features", lambda n: nnl.BatchNorm1d(n)),
    "BatchNorm2d": ("num_features", lambda n: nnl.BatchNorm2d(n)),
    "BatchNorm3d": ("num_features", lambda n: nnl.BatchNorm3d(n)),
    "FrozenBatchNorm2d": ("num_features", lambda n: nnl.FrozenBatchNorm2d(n)),
    "InstanceNorm2d": ("num_features", lambda n: nnl.InstanceNorm2d(n)),
    "BatchRenorm2d": ("num_features", lambda n: nnl.BatchRenorm2d(n)),
    "MovingAverageBatchNorm2d": ("num_features", lambda n: nnl.MovingAverageBatchNorm2d(n)),
    "MovingAverageBatchNorm2d.window": (
        "window",
        lambda n: nnl.MovingAverageBatchNorm2d(8, window=n),
    ),
    "SwitchableNorm2d": ("num_features", lambda n: nnl.SwitchableNorm2d(n)),
    "EvoNormB0_2d": ("num_features", lambda n: nnl.EvoNormB0_2d(n)),
    "EvoNormS0_2d": ("num_features", lambda n: nnl.EvoNormS0_2d(n, groups=1)),
    "EvoNormS0_2d.groups": ("groups", lambda n: nnl.EvoNormS0_2d(8, groups=n)),
    "FilterResponseNorm2d": ("num_features", lambda n: nnl.FilterResponseNorm2d(n)),
    "TLU": ("num_features", lambda n: nnl.TLU(n)),
    "GroupNorm.num_groups": ("num_groups", lambda n: nnl.GroupNorm(n, 8)),
    "GroupNorm.num_channels": ("num_channels", lambda n: nnl.GroupNorm(1, n)),
    "LayerNorm": ("normalized_shape", lambda n: nnl.LayerNorm(n)),
    "LayerNorm.list": ("normalized_shape[1]", lambda n: nnl.LayerNorm([4, n])),
    "LayerNorm2d": ("num_channels", lambda n: nnl.LayerNorm2d(n)),
    "RMSNorm": ("normalized_shape", lambda n: nnl.RMSNorm(n)),
    "RMSNorm2d": ("num_channels", lambda n: nnl.RMSNorm2d(n)),
    "LocalResponseNorm": ("size", lambda n: nnl.LocalResponseNorm(n)),
}


@pytest.mark.parametrize("value", [2.5, "8", 8.0, True, None], ids=repr)
@pytest.mark.parametrize("case", list(COUNT_CONSTRUCTORS))
def test_a_non_integer_count_is_a_type_error_naming_it(case, value):
    arg, make = COUNT_CONSTRUCTORS[case]
    expected = f"{re.escape(arg)} must be an int, got {type(value).__name__}"
    with pytest.raises(TypeError, match=expected):
        make(value)


def test_a_numeric_string_gets_the_conversion_as_the_fix():
    with pytest.raises(TypeError, match=r"num_features=int\('8'\)"):
        nnl.BatchNorm2d("8")


@pytest.mark.parametrize("case", list(COUNT_CONSTRUCTORS))
def test_integer_types_are_accepted_and_stored_as_int(case):
    arg, make = COUNT_CONSTRUCTORS[case]
    for value in (np.int64(4), torch.tensor(4)):
        layer = make(value)
        stored = getattr(layer, arg.split("[")[0], None)
        if stored is not None:
            assert all(type(v) is int for v in (stored if isinstance(stored, tuple) else (stored,)))


@pytest.mark.parametrize("case", ["BatchNorm2d", "GroupNorm.num_channels", "LocalResponseNorm"])
def test_a_count_below_one_is_a_value_error(case):
    _, make = COUNT_CONSTRUCTORS[case]
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        make(0)


C = 8
X = 3.0 + torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(0))

LAYERS = {
    "BatchNorm2d": lambda: nnl.BatchNorm2d(C),
    "BatchNorm2d.eval": lambda: nnl.BatchNorm2d(C).eval(),
    "FrozenBatchNorm2d": lambda: nnl.FrozenBatchNorm2d(C),
    "InstanceNorm2d": lambda: nnl.InstanceNorm2d(C),
    "BatchRenorm2d": lambda: nnl.BatchRenorm2d(C),
    "MovingAverageBatchNorm2d": lambda: nnl.MovingAverageBatchNorm2d(C),
    "SwitchableNorm2d": lambda: nnl.SwitchableNorm2d(C),
    "EvoNormB0_2d": lambda: nnl.EvoNormB0_2d(C),
    "EvoNormS0_2d": lambda: nnl.EvoNormS0_2d(C, groups=2),
    "FilterResponseNorm2d": lambda: nnl.FilterResponseNorm2d(C),
    "TLU": lambda: nnl.TLU(C),
    "GroupNorm": lambda: nnl.GroupNorm(2, C),
    "LayerNorm": lambda: nnl.LayerNorm([4, 4]),
    "LayerNorm2d": lambda: nnl.LayerNorm2d(C),
    "RMSNorm": lambda: nnl.RMSNorm(4),
    "RMSNorm2d": lambda: nnl.RMSNorm2d(C),
    "LocalResponseNorm": lambda: nnl.LocalResponseNorm(3),
}

ONES, ZEROS = torch.ones(C), torch.zeros(C)
FUNCTIONALS = {
    "batch_norm": lambda x: NF.batch_norm(x, None, None, training=True),
    "frozen_batch_norm": lambda x: NF.frozen_batch_norm(x, ONES, ZEROS, ZEROS, ONES),
    "batch_renorm": lambda x: NF.batch_renorm(x, ZEROS.clone(), ONES.clone(), training=True),
    "group_norm": lambda x: NF.group_norm(x, 2),
    "instance_norm": lambda x: NF.instance_norm(x),
    "layer_norm": lambda x: NF.layer_norm(x, (4, 4)),
    "layer_norm2d": lambda x: NF.layer_norm2d(x),
    "rms_norm": lambda x: NF.rms_norm(x, (4,)),
    "rms_norm2d": lambda x: NF.rms_norm2d(x),
    "local_response_norm": lambda x: NF.local_response_norm(x, 3),
    "filter_response_norm": lambda x: NF.filter_response_norm(x, ONES, ZEROS),
    "tlu": lambda x: NF.tlu(x, ZEROS),
    "evonorm_s0": lambda x: NF.evonorm_s0(x, 2, ONES, ONES, ZEROS),
}


def _bad_inputs():
    x = X.numpy()
    return {
        "numpy": (x, "numpy.ndarray", "torch.from_numpy"),
        "list": (x.tolist(), "list", "torch.tensor"),
    }


@pytest.mark.parametrize("kind", ["numpy", "list"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_refuse_non_tensor_input_with_the_conversion(name, kind):
    value, type_name, fix = _bad_inputs()[kind]
    layer = LAYERS[name]()
    layer(X)  # the same data as a tensor works
    with pytest.raises(TypeError, match=rf"expects a torch\.Tensor, got {type_name}; .*{fix}"):
        layer(value)


@pytest.mark.parametrize("kind", ["numpy", "list"])
@pytest.mark.parametrize("name", list(FUNCTIONALS))
def test_functionals_refuse_non_tensor_input_with_the_conversion(name, kind):
    value, type_name, fix = _bad_inputs()[kind]
    FUNCTIONALS[name](X)
    with pytest.raises(TypeError, match=rf"expects a torch\.Tensor, got {type_name}; .*{fix}"):
        FUNCTIONALS[name](value)
