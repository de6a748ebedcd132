"""Bad input at the lab's command line (issue #26): output paths checked before any work,
read-only commands that never write, one writer per store, one clear line each."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from normlab.cli import main
from normlab.lab.data.images import load_images
from normlab.lab.errors import DataError, StoreLockedError
from normlab.lab.run.train import EpochStats, RunConfig, RunRecord
from normlab.lab.sweep import paths
from normlab.lab.sweep.lock import lock_path
from normlab.lab.sweep.store import RunStore, StoreError


def _run(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr of ``normlab argv`` (argparse errors included)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = int(e.code)
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> str:
    """The one error line of ``err`` (argparse's usage lines above it aside)."""
    lines = [x for x in err.strip().splitlines() if x.startswith("normlab")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _store(path, norm="bn") -> None:
    cfg = RunConfig(norm=norm, batch_size=4, seed=0, epochs=1, data_hash="aaaa")
    with RunStore(path) as store:
        store.add(RunRecord(cfg, [EpochStats(1, 1.0, 50.0, 40.0, 0.01)], 40.0, 1.0, False, 9, 5, 1))


SWEEP = ("sweep", "--norms", "bn", "--batch-sizes", "2", "--seeds", "1", "--epochs", "1")


def test_sweep_out_that_is_a_file_refused_before_work(tmp_path, capsys):
    out = tmp_path / "report.txt"
    out.write_text("mine")
    code, err = _run(capsys, *SWEEP, "--out", str(out), "--db", str(tmp_path / "s.db"))
    assert code == 2 and "--out" in _one_line(err) and "is a file" in err
    assert out.read_text() == "mine" and not (tmp_path / "s.db").exists()


def test_sweep_json_that_is_a_folder_refused(tmp_path, capsys):
    code, err = _run(capsys, *SWEEP, "--json", str(tmp_path), "--db", str(tmp_path / "s.db"))
    assert code == 2 and "--json" in _one_line(err) and "is a folder" in err
    assert not (tmp_path / "s.db").exists()


def test_unwritable_folder_refused(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
    for flag, value in (("--out", ro / "rep"), ("--json", ro / "s.json"), ("--db", ro / "s.db")):
        code, err = _run(capsys, *SWEEP, flag, str(value))
        assert code == 2 and flag in _one_line(err) and "not writable" in err, err
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_real_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _run(capsys, *SWEEP, "--db", str(ro / "s.db"))
    finally:
        ro.chmod(0o755)
    assert code == 2 and "not writable" in _one_line(err)


def test_db_that_is_a_folder_is_not_called_corrupt(tmp_path, capsys):
    for command in (SWEEP, ("report",)):
        argv = (*command, "--db", str(tmp_path)) if command is SWEEP else ("report", str(tmp_path))
        code, err = _run(capsys, *argv)
        assert code == 2 and "is a folder" in _one_line(err) and "corrupt" not in err


def test_sweep_db_in_a_missing_folder(tmp_path, capsys):
    code, err = _run(capsys, *SWEEP, "--db", str(tmp_path / "nope" / "s.db"))
    assert code == 2 and "does not exist" in _one_line(err)


def test_report_outputs_refused_and_db_untouched(tmp_path, capsys):
    db = tmp_path / "s.db"
    _store(db)
    before = db.read_bytes()
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    for argv in (("--out", str(afile)), ("--json", str(tmp_path))):
        code, err = _run(capsys, "report", str(db), *argv)
        assert code == 2 and argv[0] in _one_line(err)
    code, _ = _run(capsys, "report", str(db), "--out", str(tmp_path / "rep"), "--quiet")
    assert code == 0 and db.read_bytes() == before
    assert not lock_path(db).exists()


@pytest.mark.parametrize("command", ["report", "compare"])
def test_read_only_commands_never_write_an_empty_sqlite_file(tmp_path, capsys, command):
    db = tmp_path / "empty.db"
    sqlite3.connect(db).execute("PRAGMA user_version = 1").connection.close()
    before = db.read_bytes()
    argv = ["report", str(db)] if command == "report" else ["compare", "--db", str(db)]
    code, err = _run(capsys, *argv, *(["--cells", "bn@4"] if command == "compare" else []))
    assert code == 2 and "empty SQLite database" in _one_line(err)
    assert db.read_bytes() == before


def test_compare_cells_of_one_norm_under_two_spellings(tmp_path, capsys):
    db = tmp_path / "s.db"
    _store(db)
    code, err = _run(capsys, "compare", "--db", str(db), "--cells", "BN@4,bn@4")
    assert code == 2 and "bn@4" in _one_line(err)


@pytest.mark.parametrize("norms", ["", ",", " , "])
def test_empty_norm_list_refused(tmp_path, capsys, norms):
    code, err = _run(capsys, "sweep", "--norms", norms, "--db", str(tmp_path / "s.db"))
    assert code == 2 and "--norms" in _one_line(err)
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf", "0", "-1"])
def test_non_finite_lr_refused(tmp_path, capsys, lr):
    code, err = _run(capsys, *SWEEP, f"--lr={lr}", "--db", str(tmp_path / "s.db"))
    assert code == 2 and "--lr" in _one_line(err) and "finite number > 0" in err


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-train", "-5"), ("--workers", "0"), ("--image-size", "2")]
)
def test_integer_options_named_as_given(tmp_path, capsys, flag, value):
    code, err = _run(capsys, *SWEEP, f"{flag}={value}", "--db", str(tmp_path / "s.db"))
    line = _one_line(err)
    assert code == 2 and f"argument {flag}:" in line and "max_train" not in line


def test_bench_csv_folder_refused_before_benching(tmp_path, capsys):
    code, err = _run(capsys, "bench", "--csv", str(tmp_path), "--layers", "bn", "--reps", "1")
    assert code == 2 and "--csv" in _one_line(err) and "is a folder" in err


def test_second_writer_refused_while_the_first_writes(tmp_path):
    db = tmp_path / "s.db"
    _store(db)
    # Another process's lock: a separate open file description conflicts like one.
    fd = os.open(lock_path(db), os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(StoreLockedError, match=r"another normlab sweep .*process 4242"):
            RunStore(db)
        with RunStore(db, readonly=True) as store:  # readers are not blocked
            assert len(store) == 1
    finally:
        os.close(fd)
    with RunStore(db) as first, RunStore(db) as second:  # one process shares its lock
        assert len(first) == len(second) == 1
    assert not lock_path(db).exists()


def test_second_sweep_process_refused(tmp_path, capsys):
    db = tmp_path / "s.db"
    _store(db)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from normlab.lab.sweep.store import RunStore; "
            "s = RunStore(sys.argv[1]);"
            " print('open', flush=True); time.sleep(60)",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        before = db.read_bytes()
        code, err = _run(capsys, *SWEEP, "--db", str(db), "--quiet", "--max-train", "40")
        assert code == 2 and "another normlab sweep is writing" in _one_line(err)
        assert db.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_one_dimensional_npz_images(tmp_path):
    path = tmp_path / "flat.npz"
    np.savez(path, x=np.random.default_rng(0).random(76800), y=np.arange(300) % 3)
    with pytest.raises(DataError, match=r"shape \(76800,\) \(1-D\)"):
        load_images(path)


def _doctor_file(tmp_path, body: str):
    path = tmp_path / "target.py"
    path.write_text("import torch\n" + body)
    return f"{path}:build"


def test_doctor_factory_calling_sys_exit(tmp_path, capsys):
    target = _doctor_file(tmp_path, "def build():\n    raise SystemExit(7)\n")
    code, err = _run(capsys, "doctor", target)
    assert code == 3 and "sys.exit(7)" in _one_line(err)


def test_doctor_into_a_full_device(tmp_path):
    target = _doctor_file(
        tmp_path,
        "def build():\n"
        "    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))\n"
        "    return m.eval(), torch.randn(2, 3, 8, 8)\n",
    )
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "normlab", "doctor", target],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot write standard output" in _one_line(done.stderr)


def test_store_error_for_a_missing_read_store(tmp_path):
    with pytest.raises(StoreError, match="no such run store"):
        RunStore(tmp_path / "none.db", readonly=True)
