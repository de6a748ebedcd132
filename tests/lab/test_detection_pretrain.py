"""The pretrained-backbone protocol of `--task detection`: pretrained once per family and
reused from the cache, seeds varying the head only, each treatment doing what it says
(frozen_bn, bn_eval, bn+recal), staleness per depth, and the refusals without pretraining."""

from __future__ import annotations

import pytest
import torch

from normlab.cli import main
from normlab.lab.analysis.report import render_markdown
from normlab.lab.data.det_scenes import detection_scenes
from normlab.lab.run.config import RunConfig
from normlab.lab.run.pretrain import DetectionBuilder, family, pretrained_backbone, spec
from normlab.lab.run.train import train_run

TINY = "animal-mnist:size=16,batch=16,epochs=2,lr=0.2,train=512"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))


def _config(norm: str, seed: int = 0, pretrain: str | None = TINY) -> RunConfig:
    return RunConfig(
        norm=norm,
        batch_size=4,
        seed=seed,
        epochs=1,
        task="detection",
        widths=(8, 8, 8),
        image_size=32,
        max_train=16,
        pretrain=pretrain,
    )


def _bn_layers(m: torch.nn.Module) -> list[torch.nn.Module]:
    return [x for x in m.modules() if isinstance(getattr(x, "running_var", None), torch.Tensor)]


def test_pretrained_once_per_family_and_reused(tmp_path):
    state, error = pretrained_backbone("bn", (8, 8, 8), TINY)
    files = list((tmp_path / "cache" / "pretrain").glob("*.pt"))
    assert len(files) == 1 and 0.0 <= error < 90.0  # trained: better than chance (90 %)
    mtime = files[0].stat().st_mtime_ns
    again, _ = pretrained_backbone("bn", (8, 8, 8), TINY)
    assert files[0].stat().st_mtime_ns == mtime
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert family("frozen_bn") == family("bn_eval") == family("bn+recal") == "bn"
    assert family("gn") == "gn"


def test_seeds_share_the_backbone_and_differ_in_the_head():
    split = detection_scenes(16, 8, 32)
    build = DetectionBuilder()
    torch.manual_seed(0)
    a = build(_config("bn", 0), split)
    torch.manual_seed(1)
    b = build(_config("bn", 1), split)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("backbone."))
    assert not torch.equal(sa["heat.weight"], sb["heat.weight"])
    torch.manual_seed(0)
    scratch = build(_config("bn", 0, pretrain=None), split)
    assert not torch.equal(
        scratch.state_dict()["backbone.stem.0.weight"], sa["backbone.stem.0.weight"]
    )


def test_treatments_freeze_what_they_say():
    split = detection_scenes(16, 8, 32)
    build = DetectionBuilder()
    state, _ = pretrained_backbone("bn", (8, 8, 8), TINY)
    x = split.x_train[:4]
    models = {}
    for norm in ("frozen_bn", "bn_eval", "bn+recal"):
        torch.manual_seed(0)
        models[norm] = build(_config(norm), split)
    # frozen_bn: FrozenBatchNorm everywhere in the backbone, no trainable affine
    frozen = _bn_layers(models["frozen_bn"].backbone)
    assert frozen and all(type(m).__name__ == "FrozenBatchNorm2d" for m in frozen)
    frozen_params = [n for n, _ in models["frozen_bn"].backbone.named_parameters() if "norm" in n]
    assert not frozen_params
    # bn_eval: BN modules kept with trainable affine, statistics fixed in train mode
    bn_eval = models["bn_eval"].backbone
    layers = _bn_layers(bn_eval)
    assert layers and all(m.weight.requires_grad for m in layers)
    before = [m.running_mean.clone() for m in layers]
    bn_eval.train()
    bn_eval(x + 3.0)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, layers, strict=True))
    torch.testing.assert_close(layers[0].running_mean, state["stem.1.running_mean"])
    # staleness per BN layer of the backbone, recalibration closer to the new data
    stale = build.conversion(_config("frozen_bn"))["staleness"]
    recal = build.conversion(_config("bn+recal"))["staleness"]
    assert len(stale) == len(recal) == 7
    assert stale[0] is not None and (recal[0] is None or recal[0] < stale[0])


def test_frozen_treatments_without_pretraining_are_refused(tmp_path):
    split = detection_scenes(16, 8, 32)
    for norm in ("frozen_bn", "bn_eval", "bn+recal"):
        with pytest.raises(ValueError, match="pretrain"):
            DetectionBuilder()(_config(norm, pretrain=None), split)
    argv = [
        "sweep",
        "--task",
        "detection",
        "--no-pretrain",
        "--norms",
        "bn,frozen_bn",
        "--db",
        str(tmp_path / "d.db"),
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert main(argv) == 2
    assert not (tmp_path / "d.db").exists()
    with pytest.raises(ValueError, match="bn_eval"):
        RunConfig(norm="bn_eval", batch_size=2, seed=0)
    with pytest.raises(ValueError, match="spec"):
        spec("imagenet:size=24")


def test_pretrained_run_trains_and_records_its_protocol():
    split = detection_scenes(16, 8, 32)
    record = train_run(_config("bn_eval"), split=split, build=DetectionBuilder())
    assert record.conversion["pretrain"] == TINY
    assert len(record.conversion["staleness"]) == 7
    assert set(record.final_metrics) == {"ap_error", "ap", "ap50", "ap75"}
    report = render_markdown([record])
    assert "Frozen statistics vs the detection images'" in report
    assert "| bn_eval |" in report and TINY in report
