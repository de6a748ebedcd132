"""Fixed optimizer steps (``RunConfig.steps``, ``normlab sweep --steps``) beside fixed epochs."""

from __future__ import annotations

import math

import pytest
from torch.optim.optimizer import register_optimizer_step_post_hook

import normlab.lab.sweep.orchestrate as lab_sweep
from normlab.cli import main
from normlab.lab.data.images import load_split
from normlab.lab.run.train import EpochStats, RunConfig, RunRecord, train_run, train_runs
from normlab.lab.sweep.orchestrate import SweepConfig, run_sweep
from normlab.lab.sweep.store import ProtocolMismatchError, RunStore

#: Key of the old default config, computed before `ranks`, `stem_stride` and `steps` existed.
OLD_KEY = "1d754d509908903a46df7dd18b9a2fc3"


def _config(npz, **kw) -> RunConfig:
    base = dict(norm="bn", batch_size=4, seed=3, epochs=2, data=str(npz), image_size=8)
    return RunConfig(**{**base, "max_train": None, "widths": (8, 8), **kw})


@pytest.fixture
def count_steps():
    """Every optimizer step taken while the fixture is active, as a list to count."""
    calls: list[int] = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    yield calls
    handle.remove()


def test_key_unchanged_when_steps_is_none():
    old = dict(norm="bn", batch_size=4, seed=1, epochs=4, max_train=1500)
    old.update(widths=(16, 32, 64, 128, 128), stem_stride=1)
    assert RunConfig(**old).key() == OLD_KEY
    assert RunConfig(**old, steps=None).key() == OLD_KEY
    assert RunConfig(**old, steps=400).key() != OLD_KEY
    stored = RunConfig(**old).to_dict()
    del stored["steps"]  # a record stored before the field existed
    assert RunConfig.from_dict(stored).steps is None
    assert RunConfig.from_dict(stored).key() == OLD_KEY


def test_steps_must_cover_every_evaluation_point():
    with pytest.raises(ValueError, match=r"steps must be >= epochs \(3\), got 2"):
        RunConfig(norm="bn", batch_size=4, seed=0, epochs=3, steps=2)


@pytest.mark.parametrize("batch_size", [4, 16])
def test_exact_number_of_optimizer_steps(tiny_npz, count_steps, batch_size):
    """23 steps: several passes over the 38 training images at batch 4 (9 steps a pass)
    and at batch 16 (2 a pass); evaluated after steps 11 and 23, as many points as epochs."""
    config = _config(tiny_npz, batch_size=batch_size, steps=23)
    calls = []
    record = train_run(config, on_epoch=calls.append)
    assert len(count_steps) == 23
    assert [e.step for e in record.epochs] == [11, 23]
    assert len(calls) == config.epochs and not record.diverged
    assert all(math.isfinite(e.train_loss) for e in record.epochs)


def test_packed_seeds_take_the_same_steps(tiny_npz, count_steps):
    configs = [_config(tiny_npz, seed=s, steps=13) for s in (0, 1)]
    packed = train_runs(configs, pack=True)
    assert len(count_steps) == 13  # one packed model, one optimizer
    alone = train_runs(configs, pack=False)
    assert len(count_steps) == 13 + 2 * 13
    for p, a in zip(packed, alone, strict=True):
        assert [e.step for e in p.epochs] == [e.step for e in a.epochs] == [6, 13]
        assert [e.test_error for e in p.epochs] == [e.test_error for e in a.epochs]
        for x, y in zip(p.epochs, a.epochs, strict=True):
            assert x.train_loss == pytest.approx(y.train_loss, rel=1e-4)


def test_steps_of_whole_epochs_reproduce_the_epoch_protocol(tiny_npz):
    """With steps = epochs × steps per pass, the data order, warm-up, schedule and
    evaluation points are those of the epoch protocol: the same numbers, bit for bit."""
    split = load_split(str(tiny_npz), 8, None)
    by_epochs = train_run(_config(tiny_npz, warmup_epochs=0.7), split=split)
    by_steps = train_run(_config(tiny_npz, warmup_epochs=0.7, steps=2 * 9), split=split)
    assert by_steps.epochs == by_epochs.epochs
    assert [e.step for e in by_epochs.epochs] == [9, 18]


def test_warmup_is_the_same_fraction_of_the_steps(tiny_npz):
    # warmup_epochs / epochs = 1/2 of 10 steps: the lr peaks at step 5 (the last step of
    # the first evaluation period), then decays by the cosine over the other 5.
    config = _config(tiny_npz, warmup_epochs=1.0, steps=10, base_lr=0.08)
    record = train_run(config)
    peak = 0.08 * 4 / 32
    assert record.epochs[0].lr == pytest.approx(peak, rel=1e-12)
    assert record.epochs[1].lr == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 4 / 5)))


def _stored(config: RunConfig) -> RunRecord:
    return RunRecord(config, [EpochStats(1, 1.0, 50.0, 40.0, 0.01)], 40.0, 1.5, False, 38, 10, 1)


def test_store_refuses_mixing_steps_and_epochs(tmp_path, tiny_npz, tiny_kwargs):
    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        store.add(_stored(_config(tiny_npz, epochs=1)))
        with pytest.raises(ProtocolMismatchError, match="steps off stored vs 40 now"):
            store.check_protocol(_config(tiny_npz, epochs=1, steps=40))
    with pytest.raises(ProtocolMismatchError, match="steps"):
        run_sweep(SweepConfig(norms=("bn",), batch_sizes=(4,), steps=40, **tiny_kwargs), db)


def test_sweep_progress_ends_at_its_total(tmp_path, tiny_kwargs, monkeypatch):
    """The progress bar counts evaluation points: ``epochs`` of them per run either way."""
    bars = []

    class Recorder(lab_sweep.Progress):
        def __init__(self, total: int, runs: int, enabled: bool) -> None:
            super().__init__(total, runs, False)
            self.total, self.done = total, 0
            bars.append(self)

        def epoch(self, n: int = 1) -> None:
            self.done += n

    monkeypatch.setattr(lab_sweep, "Progress", Recorder)
    kw = {**tiny_kwargs, "epochs": 2, "seeds": (0, 1)}
    config = SweepConfig(norms=("bn", "gn"), batch_sizes=(4, 16), steps=5, **kw)
    result = run_sweep(config, tmp_path / "runs.db", workers=1, progress=False)
    assert len(result.records) == 8
    assert all(r.config.steps == 5 and r.epochs[-1].step == 5 for r in result.records)
    assert [(b.total, b.done) for b in bars] == [(16, 16)]


def test_cli_steps(tmp_path, tiny_npz, capsys):
    common = ["--norms", "bn", "--batch-sizes", "4", "--seeds", "1", "--data", str(tiny_npz)]
    common += ["--image-size", "8", "--max-train", "0", "--workers", "1", "--quiet"]
    common += ["--db", str(tmp_path / "runs.db"), "--out", str(tmp_path / "rep")]
    for both in (["--epochs", "3", "--steps", "10"], ["--steps", "10", "--epochs", "2"]):
        with pytest.raises(SystemExit) as e:
            main(["sweep", *common, *both])
        assert e.value.code == 2
        assert "not allowed with --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", *common, "--steps", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err
    assert main(["sweep", *common, "--steps", "7"]) == 0
    with RunStore(tmp_path / "runs.db", create=False) as store:
        (record,) = store.records()
    assert record.config.steps == 7 and record.epochs[-1].step == 7
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "7 optimizer steps at every batch size" in report
