"""Sharded torchrun sweeps without a shared file system (:mod:`normlab.lab.sweep.ranks`).

Two ranks run ``normlab sweep`` as torchrun starts them on two machines: the same
environment variables, and each in a working directory of its own, so that the relative
``--db runs.db`` would be a different file on each. Rank 0 must hold the whole store and
rank 1's directory must stay empty. A fault injected into rank 1 (it raises, is killed,
or hangs) must end both ranks with an error naming rank 1, and rank 0 keeps every run
that reached it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist

from normlab.lab.sweep.links import DEFAULT_TIMEOUT, TIMEOUT_ENV, gist, rank_timeout
from normlab.lab.sweep.orchestrate import SweepConfig, run_sweep
from normlab.lab.sweep.store import RunStore

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

# The test's own entry point: `normlab` with, when NORMLAB_TEST_FAULT is set, a fault at
# the second run this rank hands over (the first reaches rank 0 before it).
_LAUNCHER = """
import os, signal, sys

fault = os.environ.get("NORMLAB_TEST_FAULT")
if fault:
    from normlab.lab.sweep import ranks

    real = ranks.execute_runs

    class Faulty:
        def __init__(self, store):
            self.store, self.n = store, 0

        def add(self, record):
            self.n += 1
            if self.n == 2:
                if fault == "raise":
                    raise RuntimeError("injected fault")
                os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            return self.store.add(record)

    ranks.execute_runs = lambda runs, store, *a: real(runs, Faulty(store), *a)

if __name__ == "__main__":  # not in the spawned worker processes of --workers > 1
    from normlab.cli import main

    sys.exit(main(sys.argv[1:]))
"""

# bn and gn are one packed job each: rank 0 trains bn's two seeds, rank 1 gn's.
_GRID = "--norms bn,gn --batch-sizes 4 --seeds 0,1 --epochs 1 --image-size 8 --max-train 0"


@dataclass
class _Ended:
    returncode: int
    out: str
    err: str
    at: float  # time.monotonic() when the process was seen to end


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(tmp_path: Path) -> Path:
    (tmp_path / "launch.py").write_text(_LAUNCHER)
    for rank in range(2):
        (tmp_path / f"rank{rank}").mkdir()
    return tmp_path


_TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")


def _sweep_pair(
    root: Path,
    data: str,
    fault: str | None = None,
    env: dict[str, str] | None = None,
    torchrun: bool = False,
    extra: tuple[str, ...] = (),
) -> dict[int, _Ended]:
    """Run both ranks to their end (rank 1 is killed once rank 0 ended, if it hangs).

    ``torchrun``: start each rank under a torchrun agent of its own, as on two machines
    (``--nnodes 2 --node-rank r``); else set the variables torchrun would set.
    """
    port = _free_port()
    procs, logs = [], []
    for rank in range(2):
        penv = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
        penv.update(env or {}, OMP_NUM_THREADS="1")
        launcher = [sys.executable]
        if torchrun:
            launcher += ["-m", "torch.distributed.run", "--nnodes", "2", "--node-rank"]
            launcher += [str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
            launcher += ["--master-port", str(port)]
        else:
            penv.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank))
            penv.update(WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        penv.pop("NORMLAB_TEST_FAULT", None)
        if fault and rank == 1:
            penv["NORMLAB_TEST_FAULT"] = fault
        out, err = root / f"out{rank}.txt", root / f"err{rank}.txt"
        logs.append((out, err))
        args = ["sweep", *_GRID.split(), "--data", data, "--workers", "1", "--db", "runs.db"]
        args += list(extra)
        with open(out, "w") as o, open(err, "w") as e:
            procs.append(
                subprocess.Popen(
                    [*launcher, str(root / "launch.py"), *args, "--out", "report"],
                    cwd=root / f"rank{rank}",
                    env=penv,
                    stdout=o,
                    stderr=e,
                )
            )
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 240
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, p in enumerate(procs):
                if rank not in ended and p.poll() is not None:
                    ended[rank] = time.monotonic()
            if 0 in ended and 1 not in ended and time.monotonic() > ended[0] + 10:
                break  # rank 1 hangs: the test's own fault
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if 0 not in ended:
        pytest.fail(f"rank 0 did not end within 240 s:\n{logs[0][1].read_text()[-3000:]}")
    return {
        r: _Ended(p.returncode, logs[r][0].read_text(), logs[r][1].read_text(), ended.get(r, 0))
        for r, p in enumerate(procs)
    }


def _stored(root: Path) -> list[tuple[str, int]]:
    with RunStore(root / "rank0" / "runs.db", create=False) as store:
        return sorted((r.config.norm, r.config.seed) for r in store.records())


def _all_runs() -> list[tuple[str, int]]:
    return [(n, s) for n in ("bn", "gn") for s in (0, 1)]


@pytest.mark.slow
def test_rank0_alone_writes_the_store_and_a_rerun_resumes(tmp_path, tiny_npz):
    root = _setup(tmp_path)
    first = _sweep_pair(root, str(tiny_npz))
    assert first[0].returncode == 0, first[0].err[-3000:]
    assert first[1].returncode == 0, first[1].err[-3000:]
    assert "4 new run(s), 0 already stored" in first[0].out
    assert _stored(root) == _all_runs()
    assert sorted(p.name for p in (root / "rank0").iterdir()) == ["report", "runs.db"]
    assert list((root / "rank1").iterdir()) == []  # no store, no shard, no report
    with RunStore(root / "rank0" / "runs.db") as store:
        walls = {r.key: r.wall_time for r in store.records()}

    again = _sweep_pair(root, str(tiny_npz))
    assert again[0].returncode == 0 and again[1].returncode == 0, again[0].err[-3000:]
    assert "0 new run(s), 4 already stored" in again[0].out
    with RunStore(root / "rank0" / "runs.db") as store:
        assert {r.key: r.wall_time for r in store.records()} == walls  # nothing retrained
    assert list((root / "rank1").iterdir()) == []


@pytest.mark.slow
def test_a_user_model_sweep_under_torchrun(tmp_path, tiny_npz):
    """--model on two ranks: each rank loads the factory itself; rank 0 stores the runs with
    their conversion summaries."""
    root = _setup(tmp_path)
    model = Path(__file__).resolve().parents[2] / "examples" / "my_model.py"
    got = _sweep_pair(root, str(tiny_npz), extra=("--model", f"{model}:build"))
    assert got[0].returncode == 0, got[0].err[-3000:]
    assert got[1].returncode == 0, got[1].err[-3000:]
    assert _stored(root) == _all_runs()
    with RunStore(root / "rank0" / "runs.db") as store:
        records = store.records()
    assert all(r.config.model == "my_model.py:build" and r.packed == 1 for r in records)
    assert {r.config.norm: r.conversion["converted"] for r in records} == {"bn": 4, "gn": 4}
    assert list((root / "rank1").iterdir()) == []


@pytest.mark.slow
def test_a_rank_that_raises_stops_every_rank_and_the_rerun_resumes(tmp_path, tiny_npz):
    root = _setup(tmp_path)
    got = _sweep_pair(root, str(tiny_npz), fault="raise")
    assert got[1].returncode == 1 and "RuntimeError: injected fault" in got[1].err
    assert got[0].returncode == 1, got[0].err[-3000:]
    msg = got[0].err.strip().splitlines()[-1]
    assert msg.startswith("normlab sweep: error: rank 1 failed: RuntimeError: injected fault")
    assert "stopped on every rank" in msg and "rerun the same command" in msg
    assert abs(got[0].at - got[1].at) < 30
    kept = _stored(root)
    assert ("gn", 0) in kept and ("gn", 1) not in kept  # rank 1's first run reached rank 0
    assert list((root / "rank1").iterdir()) == []

    again = _sweep_pair(root, str(tiny_npz))
    assert again[0].returncode == 0 and again[1].returncode == 0, again[0].err[-3000:]
    assert f"{4 - len(kept)} new run(s), {len(kept)} already stored" in again[0].out
    assert _stored(root) == _all_runs()


@pytest.mark.slow
def test_a_killed_rank_stops_rank0_which_keeps_what_arrived(tmp_path, tiny_npz):
    root = _setup(tmp_path)
    got = _sweep_pair(root, str(tiny_npz), fault="kill")
    assert got[1].returncode == -signal.SIGKILL
    assert got[0].returncode == 1, got[0].err[-3000:]
    msg = got[0].err.strip().splitlines()[-1]
    assert "rank 1 of 2 closed its connection without reporting an error" in msg
    assert "rerun the same command" in msg
    assert got[0].at - got[1].at < 30
    assert ("gn", 0) in _stored(root)


@pytest.mark.slow
def test_two_torchrun_agents_as_on_two_machines(tmp_path, tiny_npz):
    """Each rank under a torchrun of its own (its rendezvous store is the agents')."""
    root = _setup(tmp_path)
    got = _sweep_pair(root, str(tiny_npz), fault="kill", torchrun=True)
    assert got[0].returncode == 1, got[0].err[-3000:]
    assert "normlab sweep: error: rank 1 of 2 closed its connection" in got[0].err
    kept = _stored(root)
    assert ("gn", 0) in kept and ("gn", 1) not in kept
    again = _sweep_pair(root, str(tiny_npz), torchrun=True)
    assert again[0].returncode == 0 and again[1].returncode == 0, again[0].err[-3000:]
    assert f"{4 - len(kept)} new run(s), {len(kept)} already stored" in again[0].out
    assert _stored(root) == _all_runs()
    assert list((root / "rank1").iterdir()) == []


@pytest.mark.slow
def test_a_hung_rank_is_given_up_after_the_timeout(tmp_path, tiny_npz):
    root = _setup(tmp_path)
    got = _sweep_pair(root, str(tiny_npz), fault="stop", env={TIMEOUT_ENV: "4"})
    assert got[0].returncode == 1, got[0].err[-3000:]
    msg = got[0].err.strip().splitlines()[-1]
    assert "rank 1 of 2 sent nothing for 4 s" in msg and TIMEOUT_ENV in msg
    assert got[1].returncode == -signal.SIGKILL  # still stopped when rank 0 gave up
    assert ("gn", 0) in _stored(root)


@pytest.mark.slow
def test_a_rank_without_the_data_stops_both_before_training(tmp_path, tiny_npz):
    root = _setup(tmp_path)
    shutil.copy(tiny_npz, root / "rank0" / "tiny.npz")  # rank 1's machine lacks it
    got = _sweep_pair(root, "tiny.npz")
    assert got[1].returncode == 2 and "tiny.npz: no such file" in got[1].err
    assert got[0].returncode == 1, got[0].err[-3000:]
    msg = got[0].err.strip().splitlines()[-1]
    assert "rank 1 failed: DataError: tiny.npz: no such file" in msg
    assert _stored(root) == []
    assert list((root / "rank1").iterdir()) == []


def test_ranks_without_a_launcher_are_refused(tiny_kwargs, tmp_path, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cfg = SweepConfig(norms=("bn",), batch_sizes=(2,), **tiny_kwargs)
    with pytest.raises(ValueError, match="started together by torchrun.*MASTER_ADDR"):
        run_sweep(cfg, tmp_path / "runs.db", workers=1, progress=False, rank=1, world_size=2)
    assert not list(tmp_path.glob("runs.db*"))


def test_rank_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert rank_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert rank_timeout() == 2.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="not a positive number of seconds"):
            rank_timeout()


def test_gist_of_gloo_errors():
    closed = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
        "peer [10.0.0.7]:4242. This is typically caused by a remote worker crashing.\nmore"
    )
    assert gist(closed) == "Connection closed by peer [10.0.0.7]:4242"
    assert gist(RuntimeError("Timed out after 11 seconds. 1/2 joined.")) == (
        "Timed out after 11 seconds"
    )
    assert gist(RuntimeError("")) == "RuntimeError"
