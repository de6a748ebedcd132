"""`normlab check`, `normlab doctor` and `normlab bench` end to end."""

from __future__ import annotations

import io
import json
import sys

import pytest

from normlab.cli import main

MODEL_FILE = """
import torch
from torch import nn

def factory():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
    )
    return model, torch.randn(2, 3, 6, 6) + 3.0
"""


def test_check_lists_and_verifies_every_layer(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "BatchNorm2d train" in out and "EvoNormS0_2d" in out
    assert " 0 failed" in out


def test_doctor_reports_tiny_batch_statistic(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(MODEL_FILE)
    code = main(["doctor", f"{path}:factory", "--json"])
    report = json.loads(capsys.readouterr().out)
    codes = {f["code"] for f in report["findings"]}
    assert "tiny_batch_statistic" in codes
    assert code == 1  # an error-level finding


def test_doctor_bad_target_is_a_clear_error(tmp_path, capsys):
    assert main(["doctor", f"{tmp_path}/missing.py:factory"]) == 2
    assert "cannot load" in capsys.readouterr().err


def test_bench_writes_csv(tmp_path, capsys):
    csv = tmp_path / "b.csv"
    assert (
        main(
            [
                "bench",
                "--shape",
                "2,8,4,4",
                "--layers",
                "GroupNorm(32)",
                "--reps",
                "2",
                "--csv",
                str(csv),
            ]
        )
        == 2
    )  # 8 channels cannot take 32 groups: clear error
    assert "not divisible" in capsys.readouterr().err
    assert (
        main(
            [
                "bench",
                "--shape",
                "2,64,4,4",
                "--layers",
                "BatchNorm2d,GroupNorm(32)",
                "--reps",
                "2",
                "--csv",
                str(csv),
            ]
        )
        == 0
    )
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("# command: normlab bench")
    header = lines.index(next(x for x in lines if x.startswith("layer,")))
    assert len(lines) - header - 1 == 4  # 2 layers x (normlab, torch)


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normlab") and "sweep" in out and "bench" in out


def test_version(capsys):
    from normlab import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"normlab {__version__}"


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    report_help = " ".join(capsys.readouterr().out.split())
    assert "--quiet print nothing" in report_help and "progress bar" not in report_help
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    bench_help = " ".join(capsys.readouterr().out.split())
    for text in ("dtype of inputs and layers", "cpu, cuda, cuda:N or mps", "timed repetitions"):
        assert text in bench_help


def test_bench_warns_when_timings_spread(monkeypatch, capsys):
    import normlab.lab.bench.layers as bench

    def fake(shapes, **kw):
        return [
            bench.BenchRecord("BatchNorm2d", "2x8x4x4", "float32", "cpu", p, 1.0, lo, hi, 1, 0, 2)
            for p, lo, hi in (("normlab", 0.9, 1.1), ("torch", 0.5, 2.0))
        ]

    monkeypatch.setattr(bench, "bench_layers", fake)
    assert main(["bench", "--reps", "2"]) == 0
    err = capsys.readouterr().err
    assert "timings spread widely" in err and "up to 4.00 for BatchNorm2d 2x8x4x4 torch" in err
    assert "rerun with more --reps" in err
    assert bench.spread_warning(fake(None)[:1]) is None  # 1.1 / 0.9 is within the limit


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_pipe_is_quiet(tmp_path, monkeypatch):
    """`normlab report DB | head`: the reader is gone; no traceback, status 141."""
    from normlab.lab.run.train import EpochStats, RunConfig, RunRecord
    from normlab.lab.sweep.store import RunStore

    db = tmp_path / "runs.db"
    with RunStore(db) as store:
        for seed in (0, 1):
            cfg = RunConfig(norm="bn", batch_size=4, seed=seed)
            store.add(RunRecord(cfg, [EpochStats(1, 1.0, 9.0, 8.0, 0.1)], 8.0, 1.0, False, 9, 3, 1))
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["report", str(db), "--out", str(tmp_path / "rep")]) == 141
