"""`normlab sweep` and `normlab report` end to end on a tiny config."""

from __future__ import annotations

import json

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
