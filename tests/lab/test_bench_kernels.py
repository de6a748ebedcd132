"""The kernel benchmark on CPU: phases, bandwidth columns, skips, CSV provenance."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from normlab.cli import main
from normlab.lab.bench.kernels import PHASES, bench_kernels, default_providers


def test_records_cover_every_provider_phase_and_layout():
    messages: list[str] = []
    recs = bench_kernels(
        [(2, 32, 6, 5)],
        layers=["GroupNorm(32)", "FrozenBN+ReLU"],
        layouts=("nchw", "nhwc"),
        reps=3,
        warmup=1,
        input_sets=2,
        progress=messages.append,
    )
    keys = {(r.layer, r.layout, r.provider, r.phase) for r in recs}
    assert keys == {
        (layer, layout, prov, phase)
        for layer in ("GroupNorm(32)", "FrozenBN+ReLU")
        for layout in ("nchw", "nhwc")
        for prov in ("normlab-torch", "torch")
        for phase in PHASES
    }
    for r in recs:
        assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.gbps > 0 and r.copy_gbps > 0
        assert r.pct_of_copy == pytest.approx(100 * r.gbps / r.copy_gbps)
        assert r.mem_mib >= 0 and r.reps == 3
        if r.provider == "torch":
            assert r.ratio_vs_torch == 1.0
    # GB/s is the floor bytes (5 tensors for fwd+bwd) over the median time.
    by = {(r.layer, r.layout, r.provider, r.phase): r for r in recs}
    r = by[("GroupNorm(32)", "nchw", "torch", "fwd+bwd")]
    assert r.gbps == pytest.approx(5 * 2 * 32 * 30 * 4 / (r.median_ms * 1e-3) / 1e9)


def test_unavailable_provider_is_skipped_with_a_reason():
    messages: list[str] = []
    recs = bench_kernels(
        [(2, 32, 4, 4)],
        layers=["GroupNorm(32)"],
        providers=["normlab-triton", "torch"],
        layouts=("nchw",),
        reps=2,
        warmup=1,
        progress=messages.append,
    )
    # On a CPU without the Triton interpreter the triton backend refuses clearly.
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert {r.provider for r in recs} == {"torch"}
        assert any("skipping normlab-triton" in m for m in messages)


def test_unknown_layer_and_provider():
    with pytest.raises(KeyError, match="unknown layer"):
        bench_kernels([(2, 32, 4, 4)], layers=["NoSuchNorm"], reps=1, warmup=0)
    with pytest.raises(ValueError, match="unknown provider"):
        bench_kernels([(2, 32, 4, 4)], layers=["GroupNorm(32)"], providers=["jax"], reps=1)


def test_default_providers():
    assert default_providers("cpu") == ["normlab-torch", "torch"]
    cuda = ["normlab-triton", "normlab-torch", "torch", "torch.compile"]
    assert default_providers("cuda") == cuda


def test_cli_kernels_suite_writes_csv(tmp_path, capsys):
    out = tmp_path / "k.csv"
    rc = main(
        [
            "bench",
            "--suite",
            "kernels",
            "--shape",
            "2,32,4,4",
            "--layers",
            "GroupNorm(32)",
            "--layouts",
            "nhwc",
            "--reps",
            "2",
            "--csv",
            str(out),
        ]
    )
    assert rc == 0
    text = out.read_text().splitlines()
    assert text[0].startswith("# command: normlab bench --suite kernels")
    assert any(line.startswith("# triton: ") for line in text)
    rows = list(csv.DictReader(line for line in text if not line.startswith("#")))
    assert {row["phase"] for row in rows} == set(PHASES)
    assert {row["layout"] for row in rows} == {"nhwc"}
    assert "GB/s" in capsys.readouterr().out
    assert main(["bench", "--suite", "kernels", "--layouts", "nhcw", "--reps", "1"]) == 2


@pytest.mark.slow
def test_gpu_check_tiny_runs_every_section_under_the_interpreter(tmp_path):
    """benchmarks/gpu_check.py is known to start: --tiny on CPU, Triton's interpreter."""
    pytest.importorskip("triton")
    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_TRITON")}
    subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(out)],
        check=True, timeout=600, env=env, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())
    for name in ("env", "correctness", "determinism", "big_tensor", "cuda_graph", "speed"):
        assert "error" not in result[name], (name, result[name])
    assert set(result["env"]["auto_picks"].values()) == {"torch"}
    assert result["correctness"]["all_ok"] and len(result["correctness"]["cases"]) > 20
    assert result["determinism"]["bitwise_equal_over_3_runs"]
    providers = {r["provider"] for r in result["speed"]["records"]}
    assert providers == {"normlab-triton", "torch"}
    assert all("regime" in r for r in result["speed"]["records"])
