"""`normlab check`, `normlab doctor` and `normlab bench` end to end."""

from __future__ import annotations

import json

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
