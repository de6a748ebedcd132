"""Data-parallel runs (``--per-rank-batch``): BN sees the per-rank batch, ``bn+sync`` the global.

The decisive check: on 2 gloo ranks, ``bn+sync`` at per-rank batch 4 trains the *same*
model as one process running ``bn`` at batch 8 (same data order, same lr, DDP-averaged
gradients, global-batch statistics), while plain ``bn`` at per-rank batch 4 does not.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _ranks import run_ranks
from normlab.lab.data.images import load_split
from normlab.lab.models.resnet import build_model, resolve_norm
from normlab.lab.run.train import RunConfig, train_model
from normlab.lab.sweep.store import RunStore

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)


def _kw(npz: str) -> dict[str, Any]:
    return dict(seed=3, epochs=1, data=npz, image_size=8, max_train=None, widths=(8, 8))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # NumPy copies: tensors sent through a multiprocessing queue would be shared
    # memory that dies with the rank's process.
    state = model.state_dict()
    return {
        k: torch.from_numpy(v.detach().numpy().copy())
        for k, v in state.items()
        if v.is_floating_point()
    }


def _rank_main(rank: int, port: int, results: Any, npz: str) -> None:
    world = 2
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        try:
            out = {}
            for norm in ("bn+sync", "bn"):
                cfg = RunConfig(norm=norm, batch_size=4, ranks=world, **_kw(npz))
                split = load_split(cfg.data, cfg.image_size, cfg.max_train)
                model, history, diverged = train_model(cfg, split)
                params = {k: v.numpy() for k, v in _params(model).items()}
                out[norm] = (params, history[-1].train_loss, diverged)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def _run_two_ranks(npz: str) -> dict[int, Any]:
    return {
        rank: {
            norm: ({k: torch.from_numpy(v) for k, v in params.items()}, loss, div)
            for norm, (params, loss, div) in payload.items()
        }
        for rank, payload in run_ranks(_rank_main, npz).items()
    }


def test_synced_per_rank_batch_equals_one_process_global_batch(tiny_npz):
    got = _run_two_ranks(str(tiny_npz))
    one = RunConfig(norm="bn", batch_size=8, **_kw(str(tiny_npz)))
    model, history, _ = train_model(one, load_split(one.data, one.image_size, one.max_train))
    ref = _params(model)

    synced, synced_loss, diverged = got[0]["bn+sync"]
    assert not diverged
    assert set(synced) == set(ref)
    for k in ref:
        torch.testing.assert_close(synced[k], ref[k], rtol=2e-4, atol=2e-5, msg=k)
    # The epoch's loss is summed over both ranks: the same number as one process.
    assert synced_loss == pytest.approx(history[-1].train_loss, rel=1e-4)
    # Both ranks hold the same replica.
    for k in ref:
        torch.testing.assert_close(got[1]["bn+sync"][0][k], synced[k], msg=k)

    # Plain BN normalizes each rank's 4 images by themselves: a different model, far
    # beyond the rounding-level difference of the synced one.
    local, _, _ = got[0]["bn"]
    sync_gap = max(float((synced[k] - ref[k]).abs().max()) for k in ref)
    gap = max(float((local[k] - ref[k]).abs().max()) for k in ref)
    assert gap > max(1e-3, 50 * sync_gap), (gap, sync_gap)


def test_data_parallel_run_needs_a_process_group(tiny_npz):
    cfg = RunConfig(norm="bn", batch_size=2, ranks=2, **_kw(str(tiny_npz)))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        train_model(cfg, load_split(cfg.data, cfg.image_size, cfg.max_train))


def test_run_keys_of_single_process_runs_did_not_change():
    # The key of the old default config as computed before `ranks` and `stem_stride`
    # existed: old stores still resume; the new fields change it only when set.
    old = dict(norm="bn", batch_size=4, seed=1, epochs=4, max_train=1500)
    old.update(widths=(16, 32, 64, 128, 128), stem_stride=1)
    assert RunConfig(**old).key() == "1d754d509908903a46df7dd18b9a2fc3"
    assert RunConfig(**old, ranks=2).key() != "1d754d509908903a46df7dd18b9a2fc3"
    assert RunConfig(**{**old, "stem_stride": 2}).key() != "1d754d509908903a46df7dd18b9a2fc3"
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        RunConfig(norm="bn", batch_size=4, seed=1, ranks=0)


def test_sync_variants_resolve_and_sync():
    assert resolve_norm("bn+sync") == "bn"
    assert resolve_norm("SN+sync") == "sn"
    with pytest.raises(ValueError, match="has none to synchronize"):
        resolve_norm("gn+sync")
    model = build_model("mabn+sync", in_channels=1, num_classes=2, widths=(8, 8))
    groups = [m.process_group for m in model.modules() if hasattr(m, "process_group")]
    assert groups and all(g == "world" for g in groups)
    plain = build_model("mabn", in_channels=1, num_classes=2, widths=(8, 8))
    assert all(m.process_group is None for m in plain.modules() if hasattr(m, "process_group"))


@pytest.mark.slow
def test_torchrun_per_rank_batch_cli(tmp_path, tiny_npz):
    """The user's command under torchrun: rank 0 stores every run once; a rerun resumes."""
    db, out = tmp_path / "dp.db", tmp_path / "rep"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "normlab",
        "sweep",
        "--per-rank-batch",
        "--norms",
        "bn,bn+sync",
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
        "--db",
        str(db),
        "--out",
        str(out),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    walls = []
    for _run in range(2):  # the second run finds everything stored and trains nothing
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with RunStore(db) as store:
            records = store.records()
        assert len(records) == 4
        assert {(r.config.norm, r.config.batch_size, r.config.ranks) for r in records} == {
            (n, b, 2) for n in ("bn", "bn+sync") for b in (2, 4)
        }
        walls.append(sorted(r.wall_time for r in records))
    assert walls[0] == walls[1]
    assert not list(Path(tmp_path).glob("dp.db.rank*"))  # no shards in this mode
    report = (out / "report.md").read_text()
    assert "BN+SYNC×2" in report and "per rank" in report
