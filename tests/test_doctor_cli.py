"""``normlab doctor``: exit codes, one-line failures, --verbose, --train-batch-size, pipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.cli.doctor import (
    EXIT_CLOSED_PIPE,
    EXIT_ERRORS,
    EXIT_FORWARD,
    EXIT_OK,
    EXIT_TARGET,
    EXIT_USAGE,
)

TARGETS = """
import torch
from torch import nn


def _data(seed, n=8, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 0.8 + 0.4


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.BatchNorm1d(32),
    )


def _calibrated():
    model = _net().train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        for seed in range(3):
            model(_data(seed))
    return model.eval()


def healthy():
    return _calibrated(), _data(10)


def left_in_training():
    model = _calibrated()
    model[1].train()
    return model, _data(11)


def fresh():
    return _net().eval(), _data(12)


def wrong_input():
    return _calibrated(), torch.randn(2, 5, 8, 8)


def broken():
    raise OSError("weights.pt not found")


def many_layers():
    layers = [nn.Conv2d(3, 8, 1)]
    for _ in range(600):
        layers += [nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)]
    return nn.Sequential(*layers).eval(), _data(13, n=2, size=4)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doctor_cli") / "targets.py"
    path.write_text(TARGETS)
    return path


def doctor(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_codes_for_findings(target, capsys):
    code, out, err = doctor(capsys, f"{target}:healthy")
    assert code == EXIT_OK == 0 and "no findings" in out and not err
    code, out, _ = doctor(capsys, f"{target}:left_in_training")
    assert code == EXIT_ERRORS == 1 and "bn_training_mode" in out
    # Warnings alone pass, unless --strict.
    code, out, _ = doctor(capsys, f"{target}:fresh")
    assert code == EXIT_OK and "uncalibrated_running_stats" in out and "<model>" in out
    code, _, _ = doctor(capsys, f"{target}:fresh", "--strict")
    assert code == EXIT_ERRORS


def test_train_batch_size(target, capsys):
    # Evaluated at batch 8: fine. Trained at batch 2: the BatchNorm1d after pooling
    # computes each statistic from 2 values.
    code, out, _ = doctor(capsys, f"{target}:healthy", "--train-batch-size", "2")
    assert code == EXIT_ERRORS
    [line] = [x for x in out.splitlines() if x.startswith("error")]
    assert "tiny_batch_statistic" in line and "6" in line
    assert "training judged at batch size 2" in out
    code, _, _ = doctor(capsys, f"{target}:healthy", "--train-batch-size", "16")
    assert code == EXIT_OK
    with pytest.raises(SystemExit) as info:
        main(["doctor", f"{target}:healthy", "--train-batch-size", "0"])
    assert info.value.code == EXIT_USAGE
    assert "positive integer" in capsys.readouterr().err


def test_failures_are_one_line_with_distinct_codes(target, tmp_path, capsys):
    (tmp_path / "bad_import.py").write_text("import normlab_no_such_dependency\n")
    cases = [
        (f"{target}:wrong_input", EXIT_FORWARD, "running the model on example_inputs failed"),
        (f"{target}:broken", EXIT_TARGET, "weights.pt not found"),
        (f"{tmp_path / 'bad_import.py'}:build", EXIT_TARGET, "normlab_no_such_dependency"),
        (f"{tmp_path / 'missing.py'}:build", EXIT_USAGE, "no such file"),
        (f"{target}:nope", EXIT_USAGE, "healthy"),
        ("no_colon.py", EXIT_USAGE, "expected 'path/to/file.py:factory'"),
    ]
    for spec, expected, text in cases:
        code, out, err = doctor(capsys, spec)
        assert code == expected, (spec, err)
        assert not out and len(err.strip().splitlines()) == 1, err
        assert err.startswith("normlab doctor: ") and text in err and "Traceback" not in err
        assert "--traceback for details" in err
    code, _, err = doctor(capsys, f"{target}:wrong_input", "--traceback")
    assert code == EXIT_FORWARD and "Traceback" in err and "RuntimeError" in err


def test_verbose_lists_every_module(target, capsys):
    code, out, _ = doctor(capsys, f"{target}:many_layers")
    info = [x for x in out.splitlines() if x.startswith("info")]
    assert code == EXIT_OK and len(info) == 1 and "and 597 more" in info[0]
    assert len(out.splitlines()) < 15
    code, out, _ = doctor(capsys, f"{target}:many_layers", "--verbose")
    assert code == EXIT_OK and "VALUES/STAT" in out
    assert sum(" [info]: " in x for x in out.splitlines()) == 600


def test_json_keeps_groups_and_per_module_detail(target, capsys):
    code, out, _ = doctor(capsys, f"{target}:left_in_training", "--json")
    data = json.loads(out)
    assert code == EXIT_ERRORS and data["counts"]["error"] == 1
    assert [g["code"] for g in data["groups"]] == ["bn_training_mode"]
    assert data["groups"][0]["modules"] == ["1"]
    assert data["findings"][0]["detail"] and data["layers"][0]["module"] == "1"


@pytest.mark.parametrize("fmt", [["--json"], ["--verbose"]])
def test_closed_pipe_is_quiet(target, fmt):
    """``normlab doctor ... | head -1``: the reader leaves early; no traceback.

    Status 141 when the doctor was still writing as ``head`` left; 0 (this model has
    no error findings) when its whole output fitted into the pipe's buffer first.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    args = " ".join(fmt)
    command = (
        f'"{sys.executable}" -m normlab doctor "{target}:many_layers" {args} | head -1; '
        'echo "status=${PIPESTATUS[0]}" >&2'
    )
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300
    )
    assert len(done.stdout.splitlines()) == 1, done.stderr
    assert done.stderr in (f"status={EXIT_CLOSED_PIPE}\n", "status=0\n"), done.stderr


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["doctor", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "exit codes:" in out
    for code in (EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_TARGET, EXIT_FORWARD, EXIT_CLOSED_PIPE):
        assert f"\n  {code} " in out, code
