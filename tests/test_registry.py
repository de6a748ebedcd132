"""The registry: names, classes and partials resolve; unknown names say what exists."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import normlab.nn as nnl
from normlab.registry import (
    NORM_LAYERS,
    auto_groups,
    create_norm,
    get_norm_layer,
    group_norm_layer,
    names_taking,
    rank_matched,
)


@pytest.mark.parametrize("name", sorted(NORM_LAYERS))
def test_every_name_builds_a_module(name):
    layer = create_norm(name, 32)
    assert isinstance(layer, nn.Module)


@pytest.mark.parametrize(
    "name, cls, shape",
    [
        ("bn", nnl.BatchNorm2d, (2, 32, 4, 4)),
        ("bn1d", nnl.BatchNorm1d, (2, 32)),
        ("bn3d", nnl.BatchNorm3d, (2, 32, 2, 2, 2)),
        ("frozen_bn", nnl.FrozenBatchNorm2d, (2, 32, 4, 4)),
        ("gn", nnl.GroupNorm, (2, 32, 4, 4)),
        ("ln", nnl.LayerNorm2d, (2, 32, 4, 4)),
        ("in", nnl.InstanceNorm2d, (2, 32, 4, 4)),
    ],
)
def test_core_names_resolve_and_run(name, cls, shape):
    layer = create_norm(name, 32)
    assert type(layer) is cls
    y = layer(torch.randn(*shape))
    assert y.shape == shape


def test_names_are_case_and_dash_insensitive():
    assert type(create_norm("GN", 64)) is nnl.GroupNorm
    assert type(create_norm("frozen-bn", 8)) is nnl.FrozenBatchNorm2d


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError) as info:
        create_norm("batchnorm_typo", 8)
    msg = str(info.value)
    assert "batchnorm_typo" in msg
    for name in NORM_LAYERS:
        assert name in msg


def test_class_and_partial_and_kwargs():
    bn = create_norm(nnl.BatchNorm2d, 8, momentum=0.3)
    assert type(bn) is nnl.BatchNorm2d and bn.momentum == 0.3
    make = functools.partial(nnl.BatchNorm2d, eps=1e-3, affine=False)
    bn = create_norm(make, 8)
    assert bn.eps == 1e-3 and bn.weight is None
    gn = create_norm(functools.partial(group_norm_layer, num_groups=4), 8)
    assert gn.num_groups == 4
    assert get_norm_layer(make) is make


@pytest.mark.parametrize(
    "channels, groups", [(64, 32), (32, 32), (48, 24), (20, 20), (7, 7), (96, 32)]
)
def test_gn_groups_are_automatic(channels, groups):
    assert auto_groups(channels) == groups
    gn = create_norm("gn", channels)
    assert gn.num_groups == groups and gn.num_channels == channels
    assert create_norm("gn", channels, num_groups=1).num_groups == 1


def test_not_a_norm_is_a_type_error():
    with pytest.raises(TypeError, match="expected a norm name"):
        create_norm(3, 8)  # type: ignore[arg-type]


def test_frn_linear_is_frn_without_tlu_and_rank_matches():
    frn, linear = create_norm("frn", 8), create_norm("frn_linear", 8)
    assert frn.tau is not None and linear.tau is None
    x = torch.randn(2, 8, 4, 4) - 0.5
    assert (frn(x) >= 0).all() and (linear(x) < 0).any()  # τ = 0: the TLU is a ReLU
    make = rank_matched(get_norm_layer("frn_linear"), 3)
    assert type(make(8)) is nnl.FilterResponseNorm3d and make(8).tau is None
    assert type(rank_matched(get_norm_layer("in"), 1)(8)) is nnl.InstanceNorm1d
    assert rank_matched(group_norm_layer, 3) is group_norm_layer  # a function has no siblings


def test_names_taking_an_input_rank_are_found_by_running_the_layers():
    flat = names_taking(1, 2)  # (N, C) features after a Linear
    assert {"bn", "gn", "rms"} <= set(flat) and "ln" not in flat  # LayerNorm2d needs (N, C, *S)
    assert "evonorm_b0" not in names_taking(3, 5)  # EvoNorm exists in 2-D only
    for name in names_taking(3, 5):
        layer = rank_matched(NORM_LAYERS[name], 3)(4)
        layer(torch.randn(2, 4, 3, 3, 3) + 0.5)
