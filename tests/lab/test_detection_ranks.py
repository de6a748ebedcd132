"""Detection under data parallelism: on 2 gloo ranks, the lab's detector with ``bn+sync``
normalizes each rank's images by the statistics of the global batch (the output and the
running statistics of one process's batch of 4), plain ``bn`` does not, and a whole
``bn+sync`` run trains one replica on both ranks and scores AP.

(The trained weights are not one process's at batch 4: the detection loss is divided by
each rank's own number of objects before DDP averages the gradients, as detectors do.)"""

from __future__ import annotations

import datetime
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _ranks import run_ranks
from normlab.lab.data.det_coco import load_detection_split
from normlab.lab.run.train import RunConfig, train_model
from normlab.lab.tasks.detection import detection_model

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

KW = dict(seed=2, epochs=1, task="detection", image_size=32, max_train=16, widths=(8, 16, 16))


def _split() -> Any:
    return load_detection_split(None, KW["image_size"], KW["max_train"])


def _forward(norm: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The train-mode output of a fresh detector of ``norm`` on ``x``, and its BN buffers."""
    cfg = RunConfig(norm=norm, batch_size=len(x), **KW)
    torch.manual_seed(cfg.seed)
    model = detection_model(cfg, _split()).train()
    out = model(x).detach()
    return out, {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def _rank_main(rank: int, port: int, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
            timeout=datetime.timedelta(seconds=60),
        )  # fmt: skip
        try:
            x = _split().x_train[:4]
            out = {n: _forward(n, x[2 * rank : 2 * rank + 2]) for n in ("bn+sync", "bn")}
            cfg = RunConfig(norm="bn+sync", batch_size=2, ranks=2, **KW)
            model, history, diverged = train_model(cfg, _split())
            params = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        finally:
            dist.destroy_process_group()
        arrays = {n: (o.numpy(), {k: v.numpy() for k, v in b.items()}) for n, (o, b) in out.items()}
        results.put((rank, "ok", (arrays, params, history[-1], diverged)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1) from None


def test_synced_detector_sees_the_global_batch_and_trains_over_two_ranks():
    got = run_ranks(_rank_main, timeout=180)
    ref_out, ref_stats = _forward("bn", _split().x_train[:4])
    for rank in (0, 1):
        arrays, params, last, diverged = got[rank]
        synced_out, synced_stats = arrays["bn+sync"]
        local_out, _ = arrays["bn"]
        mine = ref_out[2 * rank : 2 * rank + 2]
        # bn+sync: each rank's 2 images normalized by the statistics of all 4.
        torch.testing.assert_close(torch.from_numpy(synced_out), mine, rtol=1e-4, atol=1e-4)
        for k, v in ref_stats.items():
            torch.testing.assert_close(torch.from_numpy(synced_stats[k]), v, msg=k)
        # Plain bn normalizes each rank's 2 images by themselves: another output.
        assert float((torch.from_numpy(local_out) - mine).abs().max()) > 1e-2
        # A whole data-parallel run: one replica on both ranks, AP from both ranks' images.
        assert not diverged and set(last.test_metrics) == {"ap_error", "ap", "ap50", "ap75"}
        assert 0 <= last.train_error <= 100 and 0 <= last.test_error <= 100
        for k, v in got[0][1].items():
            assert (params[k] == v).all(), k
