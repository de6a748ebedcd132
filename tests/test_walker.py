"""The one module-replacing walker (normlab.convert.surgery.replace): convert, distributed."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

import normlab.nn as nnl
from normlab.convert.surgery import replace
from normlab.distributed import WORLD, convert_sync, revert_sync


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)


def _to_gn(old: nn.Module, path: str) -> tuple[nn.Module, dict]:
    return nn.GroupNorm(1, old.num_features), {"from": path}


def _shared_model() -> tuple[nn.Module, nn.Module, nn.Module]:
    bn, block = nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.ReLU(), bn, block, block)
    return model, bn, block


def test_a_shared_module_becomes_one_new_module_everywhere():
    model, _, block = _shared_model()
    root, records = replace(model, _is_bn, _to_gn)
    assert root is model and len(records) == 2
    assert model[1] is model[3] and isinstance(model[1], nn.GroupNorm)
    assert model[4] is model[5] is block and isinstance(block[1], nn.GroupNorm)
    first, inner = records
    assert (first.path, first.aliases, first.details) == ("1", ("3",), {"from": "1"})
    assert (inner.path, inner.aliases) == ("4.1", ("5.1",))
    assert first.old_type == "torch.nn.modules.batchnorm.BatchNorm2d"


def test_matches_are_not_searched_inside_and_the_root_can_match():
    model, _, block = _shared_model()
    seen: list[str] = []

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict]:
        seen.append(path)
        return nn.Identity(), {}

    replace(model, lambda m: m is block, build)
    assert seen == ["4"] and model[4] is model[5] and isinstance(model[4], nn.Identity)
    bn = nn.BatchNorm2d(2)
    root, records = replace(bn, _is_bn, _to_gn)
    assert isinstance(root, nn.GroupNorm) and records[0].path == ""


def test_a_build_may_keep_the_module_and_change_it_in_place():
    model, bn, _ = _shared_model()

    def build(old: nn.Module, path: str) -> tuple[nn.Module, dict]:
        old.momentum = 0.5
        return old, {}

    _, records = replace(model, lambda m: m is bn, build)
    assert model[1] is bn and model[3] is bn and bn.momentum == 0.5
    assert records[0].aliases == ("3",)


def test_parametrizations_and_hooks_of_other_modules_survive():
    conv = parametrizations.weight_norm(nn.Conv2d(3, 4, 1))
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    calls: list[int] = []
    model.register_forward_hook(lambda *a: calls.append(1))
    replace(model, _is_bn, _to_gn)
    assert model[0] is conv and hasattr(conv, "parametrizations")
    model(torch.randn(2, 3, 2, 2))
    assert calls == [1]


def test_convert_sync_and_revert_sync_keep_sharing():
    model, _, block = _shared_model()
    synced = nnl.BatchNorm2d(4)
    model.append(synced).append(synced)
    convert_sync(model)
    assert type(model[1]) is nnl.BatchNorm2d and model[1] is model[3]
    assert model[1].process_group == WORLD and block[1].process_group == WORLD
    assert model[6] is synced and model[7] is synced and synced.process_group == WORLD
    revert_sync(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1] is model[3]
    assert synced.process_group is None and model[7] is synced
