"""Other libraries' norm names (detectron2, timm, MONAI) build the right normlab layer."""

from __future__ import annotations

import pytest
import torch

from normlab import nn as nnl
from normlab.registry import ALIASES, create_norm, get_norm

#: name -> (class, attributes), written out here, independently of the registry's table.
EXPECTED = {
    "BN": (nnl.BatchNorm2d, {"process_group": None}),
    "SyncBN": (nnl.BatchNorm2d, {"process_group": "world"}),
    "nnSyncBN": (nnl.BatchNorm2d, {"process_group": "world"}),
    "naiveSyncBN": (nnl.BatchNorm2d, {"process_group": "world"}),
    "FrozenBN": (nnl.FrozenBatchNorm2d, {}),
    "GN": (nnl.GroupNorm, {"num_groups": 32}),
    "LN": (nnl.LayerNorm2d, {}),
    "batchnorm": (nnl.BatchNorm2d, {}),
    "batchnorm1d": (nnl.BatchNorm1d, {}),
    "batchnorm2d": (nnl.BatchNorm2d, {}),
    "groupnorm": (nnl.GroupNorm, {"num_groups": 32}),
    "groupnorm1": (nnl.GroupNorm, {"num_groups": 1}),
    "layernorm2d": (nnl.LayerNorm2d, {}),
    "frozenbatchnorm2d": (nnl.FrozenBatchNorm2d, {}),
    "rmsnorm2d": (nnl.RMSNorm2d, {}),
    "batch": (nnl.BatchNorm2d, {}),
    "instance": (nnl.InstanceNorm2d, {"affine": False}),
    "group": (nnl.GroupNorm, {"num_groups": 32}),
    "syncbatch": (nnl.BatchNorm2d, {"process_group": "world"}),
}


def test_the_table_is_the_expected_one() -> None:
    assert set(ALIASES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_builds_its_layer(name: str) -> None:
    cls, attrs = EXPECTED[name]
    for layer in (create_norm(name, 64), get_norm(name, 64)):
        assert type(layer) is cls, (name, type(layer))
        for key, value in attrs.items():
            assert getattr(layer, key) == value, (name, key)
        channels = getattr(layer, "num_features", getattr(layer, "num_channels", None))
        assert channels == 64 or name in ("LN", "layernorm2d", "rmsnorm2d"), name
        x = 0.5 + torch.randn(2, 64, 3, 3) if cls is not nnl.BatchNorm1d else torch.randn(4, 64)
        assert torch.isfinite(layer.eval()(x)).all()


def test_detectron2_and_monai_forms() -> None:
    assert get_norm("", 64) is None and get_norm(None, 64) is None
    gn = get_norm(("group", {"num_groups": 8}), 64)
    assert type(gn) is nnl.GroupNorm and (gn.num_groups, gn.num_channels) == (8, 64)
    assert get_norm("GN", 64).num_groups == 32
    assert type(get_norm(nnl.BatchNorm2d, 16)) is nnl.BatchNorm2d
    with pytest.raises(TypeError, match="MONAI's"):
        get_norm(("group", 8), 64)
    with pytest.raises(KeyError, match="SyncBN"):
        create_norm("NoSuchNorm", 8)
