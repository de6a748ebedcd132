"""normlab.integrations.mmengine: the registry entries (as mmcv's build_norm_layer calls them)
and the precise-BN hook in a small mmengine Runner loop on CPU."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from normlab import nn as nnl
from normlab.recalibrate import recalibrate
from zoo._zoo import require

require("torchvision")  # mmengine's runner imports torchvision
MM = require("normlab.integrations.mmengine")
require("mmengine")
from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.registry import MODELS, Registry  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

#: mmengine's own notices (its checkpoint loader, its runner on a CPU machine), not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning:mmengine"),
]

EXPECTED = {
    "NL-BN": (nnl.BatchNorm2d, {}),
    "NL-BN1d": (nnl.BatchNorm1d, {}),
    "NL-BN3d": (nnl.BatchNorm3d, {}),
    "NL-SyncBN": (nnl.BatchNorm2d, {"process_group": "world"}),
    "NL-FrozenBN": (nnl.FrozenBatchNorm2d, {}),
    "NL-GN": (nnl.GroupNorm, {"num_groups": 4}),
    "NL-LN": (nnl.LayerNorm2d, {}),
    "NL-IN": (nnl.InstanceNorm2d, {"affine": True}),
    "NL-FRN": (nnl.FilterResponseNorm2d, {}),
    "NL-SN": (nnl.SwitchableNorm2d, {}),
    "NL-MABN": (nnl.MovingAverageBatchNorm2d, {}),
    "NL-BRN": (nnl.BatchRenorm2d, {}),
    "NL-EvoNormB0": (nnl.EvoNormB0_2d, {}),
    "NL-RMS": (nnl.RMSNorm2d, {}),
}


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry("normlab-test-models")
    assert MM.register(reg) == list(MM.NAMES)
    return reg


def test_every_name_builds_normlab_layer(registry) -> None:
    assert set(EXPECTED) <= set(MM.NAMES)
    for name, (cls, attrs) in EXPECTED.items():
        kwargs = {"num_groups": 4} if name == "NL-GN" else {}
        layer = registry.build(dict(type=name, num_features=8, **kwargs))
        assert type(layer) is cls, name
        for key, value in attrs.items():
            assert getattr(layer, key) == value, (name, key)
        assert all(p.requires_grad for p in layer.parameters()), name


def test_mmengine_models_builds_group_norm() -> None:
    MM.register(force=True)
    gn = MODELS.build(dict(type="NL-GN", num_groups=4, num_channels=8))
    assert type(gn) is nnl.GroupNorm and (gn.num_groups, gn.num_channels) == (4, 8)
    x = 3.0 + torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(gn(x), nn.functional.group_norm(x, 4, gn.weight, gn.bias))


def test_build_norm_layer_conventions(registry) -> None:
    """mmcv's build_norm_layer pops requires_grad, reads ``_abbr_`` for the name and
    calls ``cls(num_features, **cfg)``; a config's requires_grad reaches the layer."""
    cls = registry.get("NL-GN")
    assert cls._abbr_ == "gn"
    gn = cls(16, num_groups=8, eps=1e-5)
    assert (gn.num_groups, gn.num_channels, gn.eps) == (8, 16, 1e-5)
    frozen = registry.build(dict(type="NL-FRN", num_features=8, requires_grad=False))
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(TypeError, match="channel count once"):
        cls(8, num_channels=8, num_groups=2)


class Net(BaseModel):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            MODELS.build(dict(type="NL-BN", num_features=8)),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 2),
        )

    def forward(self, inputs, labels=None, mode="tensor"):
        out = self.body(inputs)
        if mode == "loss":
            return {"loss": nn.functional.cross_entropy(out, labels)}
        if mode == "predict":
            return [(o, y) for o, y in zip(out, labels, strict=True)]
        return out


class Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = 2.0 + 1.5 * torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.x[i], "labels": self.y[i]}


class Accuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(int(o.argmax() == y) for o, y in data_samples)

    def compute_metrics(self, results):
        return {"accuracy": sum(results) / len(results)}


def test_runner_loop_with_precise_bn_hook(tmp_path) -> None:
    MM.register(force=True)
    torch.manual_seed(0)
    loader = functools.partial(
        dict, sampler=dict(type="DefaultSampler", shuffle=False), batch_size=4,
        collate_fn=dict(type="default_collate"),
    )  # fmt: skip
    hook = MM.PreciseBNHook(num_batches=3)
    runner = Runner(
        model=Net(), work_dir=str(tmp_path), train_dataloader=loader(dataset=Dataset(16, 0)),
        val_dataloader=loader(dataset=Dataset(8, 1)), val_evaluator=[Accuracy()],
        train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=1), val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05)), custom_hooks=[hook],
        default_hooks=dict(checkpoint=None, logger=None), default_scope=None,
    )  # fmt: skip
    model = runner.train()
    assert hook.last is not None and hook.last.num_batches == 3
    assert len(hook.last.recalibrated) == 2
    # The statistics are those of the first 3 training batches under the final weights.
    batches = [b for _, b in zip(range(3), runner.train_dataloader, strict=False)]
    ref = recalibrate(copy.deepcopy(model).eval(), batches, forward_fn=MM._default_forward)
    for (name, got), want in zip(
        model.state_dict().items(), ref.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
