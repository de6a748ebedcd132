"""``bn+recal`` and ``bn+recal-pb``: BN whose running statistics are recalibrated before
each evaluation (population / per-batch variance). Training is exactly BN's; only the
statistics used in eval mode differ."""

from __future__ import annotations

import copy

import pytest
import torch

from normlab.lab.data.images import load_split
from normlab.lab.models.resnet import recal_variance, resolve_norm
from normlab.lab.run.train import RunConfig, train_model
from normlab.recalibrate import recalibrate


def _config(npz, norm: str) -> RunConfig:
    return RunConfig(
        norm=norm,
        batch_size=4,
        seed=7,
        epochs=2,
        data=str(npz),
        image_size=8,
        max_train=None,
        widths=(8, 16),
        base_lr=0.05,
    )


def test_names():
    assert resolve_norm("bn+recal-pb") == resolve_norm("BN+recal_pb") == "bn"
    assert recal_variance("bn+recal-pb") == "per_batch"
    assert recal_variance("bn+recal") == "population"
    assert recal_variance("bn") is None


@pytest.fixture
def trained(tiny_npz):
    split = load_split(str(tiny_npz), 8, None)
    runs = {n: train_model(_config(tiny_npz, n), split) for n in ("bn", "bn+recal", "bn+recal-pb")}
    return split, runs


def test_recalibrated_variants_train_exactly_like_bn(trained):
    _, runs = trained
    bn_model, bn_history, _ = runs["bn"]
    params = dict(bn_model.named_parameters())
    for norm in ("bn+recal", "bn+recal-pb"):
        model, history, diverged = runs[norm]
        assert not diverged
        assert [(e.train_loss, e.train_error, e.lr) for e in history] == [
            (e.train_loss, e.train_error, e.lr) for e in bn_history
        ], norm
        for name, p in model.named_parameters():
            assert torch.equal(p, params[name]), f"{norm}: {name}"


def test_only_the_eval_statistics_differ(trained):
    split, runs = trained
    bn_model = runs["bn"][0]
    x = split.x_train
    batches = [x[i : i + 4] for i in range(0, len(x) - 3, 4)]
    for norm, variance in (("bn+recal", "population"), ("bn+recal-pb", "per_batch")):
        # The last recalibration ran on BN's final weights: redo it on BN's model.
        want = recalibrate(
            copy.deepcopy(bn_model).eval(),
            batches,
            method="precise",
            variance=variance,
            progress=False,
        )
        got = runs[norm][0].state_dict()
        for name, buf in want.state_dict().items():
            torch.testing.assert_close(got[name], buf, rtol=0, atol=0, msg=f"{norm}: {name}")
    pop, pb = runs["bn+recal"][0].state_dict(), runs["bn+recal-pb"][0].state_dict()
    var_names = [k for k in pop if k.endswith("running_var")]
    assert var_names
    assert any(not torch.equal(pb[k], pop[k]) for k in var_names)
    means = [k for k in pop if k.endswith("running_mean")]
    assert any(not torch.equal(pop[k], bn_model.state_dict()[k]) for k in means)
