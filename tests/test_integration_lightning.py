"""normlab.integrations.lightning: the LayerSync plugin and the callbacks in a real Trainer.fit.

One process on CPU (the callbacks, the plugin's apply/revert), and 2 processes with the
``ddp_spawn`` strategy on gloo (the plugin applied by Lightning, the statistics pooled
over the ranks and identical on both).
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlab import nn as nnl
from normlab.recalibrate import recalibrate
from test_distributed import run_world
from zoo._zoo import require

require("torchvision")  # lightning imports torchmetrics, which imports torchvision
L = require("lightning")
NL = require("normlab.integrations.lightning")

#: Lightning's advice for real jobs (workers, logging interval), and its use of torch APIs
#: that torch 2.13 deprecates: not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
]


class Net(L.pytorch.LightningModule):
    """Torch and normlab BatchNorm, and a BN on a 1×1 map (the doctor's tiny statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nnl.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.BatchNorm2d(8),
            nn.Flatten(),
            nn.Linear(8, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 + 1.5 * torch.randn(48, 3, 8, 8, generator=g)
    y = torch.randint(0, 2, (48,), generator=g)
    train = DataLoader(TensorDataset(x[:32], y[:32]), batch_size=4)
    val = DataLoader(TensorDataset(x[32:], y[32:]), batch_size=8)
    return train, val


def trainer(**kwargs) -> L.pytorch.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=4, limit_val_batches=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=1,
    )  # fmt: skip
    options.update(kwargs)
    return L.pytorch.Trainer(**options)


class Counting(NL.PreciseBN):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def recalibrate(self, trainer, pl_module):
        self.calls.append(trainer.state.stage.value)
        super().recalibrate(trainer, pl_module)


def test_fit_with_precise_bn_and_doctor(caplog) -> None:
    torch.manual_seed(0)
    model = Net()
    train, val = loaders()
    precise, doctor = Counting(3), NL.Doctor()
    with caplog.at_level(logging.INFO, logger="normlab.integrations.lightning"):
        trainer(callbacks=[precise, doctor]).fit(model, train, val)
    # Before each of the 2 validations (not the sanity check) and at the end of training.
    assert precise.calls == ["validate", "validate", "train"], precise.calls
    assert precise.last.num_batches == 3 and len(precise.last.recalibrated) == 3
    # The final statistics are those of the first 3 training batches under the final weights.
    ref = recalibrate(copy.deepcopy(model).eval(), [x for x, _ in list(train)[:3]])
    for (name, got), want in zip(
        model.state_dict().items(), ref.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    assert model.training  # modes are as Lightning left them
    assert doctor.report is not None and "tiny_batch_statistic" in doctor.report.codes
    assert "normlab doctor" in caplog.text and "tiny_batch_statistic" in caplog.text


def test_doctor_strict_stops_the_fit_on_errors() -> None:
    train, val = loaders()
    with pytest.raises(RuntimeError, match="normlab doctor found errors"):
        trainer(callbacks=[NL.Doctor(strict=True, train_batch_size=2)]).fit(Net(), train, val)


def test_the_plugin_converts_and_reverts() -> None:
    plugin = NL.NormlabSync()
    assert isinstance(plugin, L.pytorch.plugins.LayerSync)
    model = Net()
    synced = plugin.apply(model)
    assert type(synced.body[1]) is nnl.BatchNorm2d and synced.body[1].process_group == "world"
    assert synced.body[4].process_group == "world"
    back = plugin.revert(synced)
    assert type(back.body[1]) is nn.BatchNorm2d and back.body[4].process_group is None


class CheckSynced(L.pytorch.Callback):
    """In each rank: the plugin's layers synced while training; after fit, the running
    statistics identical on every rank and counting every rank's batches."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layers = [m for m in pl_module.modules() if isinstance(m, nnl.BatchNorm2d)]
        assert len(layers) == 3 and all(m.process_group == "world" for m in layers)

    def on_train_end(self, trainer, pl_module):  # after PreciseBN's (callbacks in order)
        import torch.distributed as dist

        stats = torch.cat([b.double().reshape(-1) for b in pl_module.buffers()])
        rows = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, stats)
        assert all(torch.equal(r, rows[0]) for r in rows)
        assert pl_module.body[1].num_batches_tracked.item() == 2 * 3


def scenario_ddp(rank: int, world: int) -> None:
    """One rank of a 2-process ``strategy="ddp"`` fit, launched as torchrun would (the
    process group exists, ``LOCAL_RANK`` / ``WORLD_SIZE`` tell Lightning its place)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # read, never connected to
    train, val = loaders()
    model = Net()
    fit = trainer(
        devices=world, strategy="ddp", plugins=[NL.NormlabSync()], max_epochs=1,
        callbacks=[NL.PreciseBN(3), CheckSynced()],
    )  # fmt: skip
    fit.fit(model, train, val)
    assert type(model.body[1]) is nn.BatchNorm2d  # reverted at teardown


@pytest.mark.slow
def test_fit_on_two_ddp_processes() -> None:
    run_world(scenario_ddp, 2, timeout=300.0)
