"""The training loop's extension points: the task (loss, errors) and the model builder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab.data.images import load_split
from normlab.lab.run.loop import build_networks, lab_model, train_loop
from normlab.lab.run.train import RunConfig
from normlab.lab.tasks.task import CLASSIFICATION, Classification, Task


def _configs(npz, seeds=(3,), **kw) -> list[RunConfig]:
    base = dict(norm="gn", batch_size=4, epochs=2, data=str(npz), image_size=8, max_train=None)
    return [RunConfig(seed=s, **{**base, "widths": (8, 8), **kw}) for s in seeds]


def test_classification_loss_and_errors():
    assert isinstance(CLASSIFICATION, Task)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 5, generator=gen) * 2 + 1.5
    target = torch.randint(0, 5, (3, 7), generator=gen)
    losses = CLASSIFICATION.loss(logits, target)
    assert losses.shape == (3,)
    for s in range(3):
        torch.testing.assert_close(losses[s], F.cross_entropy(logits[s], target[s]))
    # One network: exactly the mean-reduced loss a lone model's training computes.
    assert torch.equal(
        CLASSIFICATION.loss(logits[:1], target[:1])[0], F.cross_entropy(logits[0], target[0])
    )
    tally = CLASSIFICATION.tally(logits, target) + CLASSIFICATION.tally(logits, target)
    wrong = (logits.argmax(-1) != target).sum(1)
    assert tally.tolist() == [[2 * int(w), 14] for w in wrong]
    errors = CLASSIFICATION.errors(tally)
    assert [e["error"] for e in errors] == [100.0 * int(w) / 7 for w in wrong]


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _TinyNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


def test_a_user_builder_replaces_the_lab_model(tiny_npz):
    split = load_split(str(tiny_npz), 8, None)
    calls = []

    def build(config: RunConfig, split, packs: int) -> nn.Module:
        calls.append(packs)
        if packs != 1:
            raise ValueError("_TinyNet cannot pack seeds; train with pack=False")
        return _TinyNet(split.in_channels, split.num_classes)

    (config,) = _configs(tiny_npz)
    init = build_networks([config], split, build)
    again = build_networks([config], split, build)
    assert _same(init, again)
    model, [(history, diverged)] = train_loop([config], split, build=build)
    assert isinstance(model, _TinyNet) and calls == [1, 1, 1]
    assert len(history) == config.epochs and not diverged
    assert not _same(init, model)
    with pytest.raises(ValueError, match="cannot pack"):
        train_loop(_configs(tiny_npz, seeds=(0, 1)), split, build=build)


def test_the_default_builder_is_the_lab_resnet(tiny_npz):
    split = load_split(str(tiny_npz), 8, None)
    (config,) = _configs(tiny_npz)
    torch.manual_seed(config.seed)
    want = lab_model(config, split)
    got = build_networks([config], split)
    assert type(got) is type(want)
    assert _same(want, got)


class _Shapes(Classification):
    """Classification with a doubled loss and a second metric; records what it saw."""

    metrics = ("doubled", "error")

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.seen.append((tuple(output.shape), tuple(target.shape)))
        return 2.0 * super().loss(output, target)

    def errors(self, tally: torch.Tensor) -> list[dict[str, float]]:
        return [{"doubled": 2.0 * e["error"], **e} for e in super().errors(tally)]


@pytest.mark.parametrize("seeds", [(3,), (3, 5)])
def test_a_task_gives_the_loss_and_the_headline_error(tiny_npz, seeds):
    split = load_split(str(tiny_npz), 8, None)
    configs = _configs(tiny_npz, seeds=seeds, epochs=1, steps=1)
    task = _Shapes()
    _, got = train_loop(configs, split, task=task)
    _, want = train_loop(configs, split)
    assert task.seen == [((len(seeds), 4, 2), (len(seeds), 4))]
    for (g, _), (w, _) in zip(got, want, strict=True):
        assert g[0].train_loss == 2.0 * w[0].train_loss  # one step: the same weights
        assert g[0].train_error == 2.0 * w[0].train_error
        assert g[0].test_error == 2.0 * w[0].test_error
