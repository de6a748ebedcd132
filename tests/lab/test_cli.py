"""`normlab sweep` and `normlab report` end to end on a tiny config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normlab.cli import main


def _sweep_args(tmp_path, tiny_npz, *extra):
    return [
        "sweep",
        "--norms",
        "bn,gn",
        "--batch-sizes",
        "2,4",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--data",
        str(tiny_npz),
        "--image-size",
        "8",
        "--max-train",
        "0",
        "--workers",
        "1",
        "--db",
        str(tmp_path / "runs.db"),
        "--out",
        str(tmp_path / "rep"),
        *extra,
    ]


@pytest.mark.slow
def test_sweep_then_report(tmp_path, tiny_npz, capsys):
    assert main(_sweep_args(tmp_path, tiny_npz, "--json", str(tmp_path / "s.json"))) == 0
    out = capsys.readouterr().out
    assert "| BN |" in out and "4 new run(s)" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert {(s["norm"], s["batch_size"]) for s in summary} == {
        ("bn", 2),
        ("bn", 4),
        ("gn", 2),
        ("gn", 4),
    }
    assert (tmp_path / "rep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # Rerunning resumes: nothing new.
    assert main(_sweep_args(tmp_path, tiny_npz, "--quiet")) == 0
    assert capsys.readouterr().out == ""
    p = tmp_path / "r.json"
    assert (
        main(
            ["report", str(tmp_path / "runs.db"), "--json", str(p), "--out", str(tmp_path / "rep2")]
        )
        == 0
    )
    assert json.loads(p.read_text()) == summary
    assert (tmp_path / "rep2" / "report.md").exists()


def test_bad_arguments_exit_2(tmp_path, tiny_npz, capsys):
    assert main(_sweep_args(tmp_path, tiny_npz, "--norms", "bogus")) == 2
    assert "unknown norm 'bogus'" in capsys.readouterr().err
    assert main(_sweep_args(tmp_path, tiny_npz, "--batch-sizes", "0,2")) == 2
    assert "batch size 0" in capsys.readouterr().err


def test_empty_dataset_exit_2(tmp_path, tiny_npz, capsys):
    (tmp_path / "empty").mkdir()
    args = _sweep_args(tmp_path, tiny_npz)
    args[args.index("--data") + 1] = str(tmp_path / "empty")
    assert main(args) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_report_on_corrupt_db(tmp_path, capsys):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 200)
    assert main(["report", str(bad)]) == 2
    assert "not a readable SQLite database" in capsys.readouterr().err


def _set(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.slow
def test_other_protocol_refused_unless_allowed(tmp_path, tiny_npz, capsys):
    one = _set(_sweep_args(tmp_path, tiny_npz, "--quiet"), "--norms", "bn")
    one = _set(one, "--batch-sizes", "2")
    assert main(one) == 0
    two = _set(one, "--epochs", "2")
    assert main(two) == 2
    err = capsys.readouterr().err
    assert "holds runs of another protocol (epochs 1 stored vs 2 now)" in err
    assert "another --db" in err and "--allow-mixed-protocols" in err
    summary = tmp_path / "s.json"
    assert main([*two, "--allow-mixed-protocols", "--json", str(summary)]) == 0
    # The sweep reports its own grid; the store's report keeps both protocols apart.
    assert [r["n_seeds"] for r in json.loads(summary.read_text())] == [1]
    report = ["report", str(tmp_path / "runs.db"), "--out", str(tmp_path / "rep2")]
    assert main([*report, "--json", str(summary)]) == 0
    rows = json.loads(summary.read_text())
    assert sorted((r["protocol"], r["n_seeds"]) for r in rows) == [("epochs=1", 1), ("epochs=2", 1)]
    out = capsys.readouterr().out
    assert "| BN (epochs=1) |" in out and "| BN (epochs=2) |" in out


def test_unknown_or_missing_device(tmp_path, tiny_npz, capsys):
    import torch

    assert main(_sweep_args(tmp_path, tiny_npz, "--device", "gpu")) == 2
    err = capsys.readouterr().err
    assert "unknown device 'gpu'; use cpu, cuda" in err and "Traceback" not in err
    assert main(["bench", "--device", "gpu", "--reps", "1"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(_sweep_args(tmp_path, tiny_npz, "--device", "cuda")) == 2
        assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "runs.db").exists()


def test_data_errors_come_before_the_store(tmp_path, tiny_npz, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 not an archive" * 50)
    assert main(_set(_sweep_args(tmp_path, tiny_npz), "--data", str(garbage))) == 2
    err = capsys.readouterr().err
    assert "not a .npz archive" in err and "x (images" in err
    nan = tmp_path / "nan.npz"
    x = np.zeros((20, 8, 8), np.float32)
    x[4, 0, 0] = np.nan
    np.savez(nan, x=x, y=np.arange(20) % 2)
    assert main(_set(_sweep_args(tmp_path, tiny_npz), "--data", str(nan))) == 2
    assert "non-finite" in capsys.readouterr().err
    # 38 training images cannot fill a batch of 64.
    assert main(_set(_sweep_args(tmp_path, tiny_npz), "--batch-sizes", "2,64")) == 2
    assert "fewer than the batch size 64" in capsys.readouterr().err
    assert not (tmp_path / "runs.db").exists()  # nothing was created
