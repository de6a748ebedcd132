"""Ctrl-C on `normlab sweep`: the prompt comes back at once, quietly, nothing finished lost.

The sweep runs as a subprocess in its own session and gets SIGINT on its whole process
group, as a terminal's Ctrl-C does (the workers get it too).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from normlab.lab.sweep.orchestrate import SweepConfig

pytestmark = pytest.mark.slow

#: Two cells: batch 16 takes 2 steps an epoch and ends long before batch 2 (19 steps).
GRID = dict(norms=("bn",), batch_sizes=(2, 16), seeds=(0, 1), epochs=40, image_size=8)


def _start(tiny_npz, db):
    args = [
        sys.executable,
        "-m",
        "normlab",
        "sweep",
        "--norms",
        "bn",
        "--batch-sizes",
        "2,16",
        "--seeds",
        "2",
        "--epochs",
        str(GRID["epochs"]),
        "--data",
        str(tiny_npz),
        "--image-size",
        "8",
        "--max-train",
        "0",
        "--workers",
        "2",
        "--quiet",
        "--db",
        str(db),
    ]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _stored(db) -> set[str]:
    if not db.exists():
        return set()
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT key FROM runs")}
    except sqlite3.OperationalError:  # tables not created yet
        return set()
    finally:
        con.close()


def _wait_for(cond, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep did not get that far in time"
        time.sleep(0.05)


def _interrupt(proc, times: int) -> tuple[float, str, str]:
    start = time.monotonic()
    for _ in range(times):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.1)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return time.monotonic() - start, out, err


def test_ctrl_c_keeps_finished_runs_and_exits_at_once(tmp_path, tiny_npz):
    db = tmp_path / "runs.db"
    proc = _start(tiny_npz, db)
    _wait_for(lambda: len(_stored(db)) >= 2, proc)  # the batch-16 cell (2 seeds) is stored
    elapsed, _, err = _interrupt(proc, 1)
    assert proc.returncode == 130
    assert elapsed < 5.0
    assert "Traceback" not in err
    assert "2 run(s) finished during this sweep" in err
    assert "2 run(s) in flight were dropped (bn at batch 2, seed(s) 0, 1)" in err
    # Resume: the stored runs are the batch-16 cell; a rerun trains only batch 2.
    planned = SweepConfig(**GRID, data=str(tiny_npz), max_train=None).runs()
    stored = _stored(db)
    assert {r.key() for r in planned if r.batch_size == 16} == stored


def test_second_ctrl_c_is_quiet(tmp_path, tiny_npz):
    db = tmp_path / "runs.db"
    proc = _start(tiny_npz, db)
    _wait_for(db.exists, proc)  # the sweep has started (data checked, store opened)
    elapsed, _, err = _interrupt(proc, 2)
    assert proc.returncode == 130
    assert elapsed < 5.0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted" in err
    planned = SweepConfig(**GRID, data=str(tiny_npz), max_train=None).runs()
    assert _stored(db) <= {r.key() for r in planned}
