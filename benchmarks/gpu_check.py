"""The one prepared GPU check of normlab's Triton kernels (issue 22): JSON out.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json   # on a GPU
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json          # CPU, interpreter

Sections (each time-boxed, 480 s in all; the JSON is rewritten after every section, so a crash or a
slow section never loses the others): environment and what ``backend="auto"`` picks
per op; correctness of y, dx, dγ, dβ (τ, running statistics) against float64 torch on
fresh off-center data; bitwise determinism over 3 runs; one tensor over 2**31
elements; CUDA-graph capture; speed (median, GB/s, % of a measured copy, ratio to torch
eager and torch.compile(dynamic=False), interleaved) on small-batch shapes of real nets,
with each shape's regime for ``normlab/_core/measured.py``. No network, no install step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from typing import Any

if "--tiny" in sys.argv:  # the interpreter must be on before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import normlab.functional as NF  # noqa: E402
from normlab._core import dispatch, measured  # noqa: E402
from normlab.lab.bench.kernels import bench_kernels  # noqa: E402

SPEED_SHAPES = [
    (1, 320, 64, 64), (2, 640, 32, 32), (2, 256, 32, 32), (8, 256, 64, 64),
    (1, 128, 512, 512), (16, 64, 56, 56), (8, 512, 7, 7), (2, 64, 16, 32, 32),
]  # fmt: skip
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout("section ran out of time")


def offcenter(shape, dtype, device, seed, loc=3.0, scale=2.0, fmt="nchw"):
    g = torch.Generator().manual_seed(seed)
    x = (loc + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if fmt == "cl":
        x = x.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[x.dim()])
    return x.to(device)


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    return float((a - e).abs().max() / (e.abs().max() + 1e-12)) if e.numel() else 0.0


def _compare(fn, tensors: dict, dtype, device, seed=7) -> dict:
    """Kernel (backend='triton') against the float64 torch path: max relative errors."""
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}
    y = fn(backend="triton", **leaves)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(dtype).to(device))
    ref = {k: v.detach().double().requires_grad_() for k, v in tensors.items()}
    y64 = fn(backend="torch", **ref)
    g64 = torch.autograd.grad(y64, list(ref.values()), dy.to(device))
    errs = {"y": _rel(y, y64)} | {
        f"d{k}": _rel(a, e) for k, a, e in zip(ref, grads, g64, strict=True)
    }
    finite = bool(torch.isfinite(y.float()).all()) and all(
        bool(torch.isfinite(t.float()).all()) for t in grads
    )
    return {"errors": errs, "ok": finite and max(errs.values()) <= TOL[dtype] * 10}


def section_env(device: str, ctx: dict) -> dict:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "device": device,
        "NORMLAB_TRITON": os.environ.get("NORMLAB_TRITON"),
        "triton_tested": dispatch.TRITON_TESTED,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as e:
        info["triton"] = f"not importable: {e}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "sms": props.multi_processor_count,
                 "capability": list(torch.cuda.get_device_capability(0))}  # fmt: skip
    x = offcenter((2, 8, 4, 4), torch.float32, device, 0)
    info["auto_blocker"] = dispatch.auto_blocker(x) if device == "cuda" else "CPU input"
    info["auto_picks"] = {
        op.value: dispatch.resolve_backend(op, "auto", x)
        for op, paths in dispatch.OP_PATHS.items()
        if paths.triton is None
    }
    return info


def section_correctness(device: str, ctx: dict) -> dict:
    tiny = ctx["tiny"]
    hws = [(1, 1), (3, 5)] if tiny else [(1, 1), (7, 7), (64, 64), (300, 300)]
    batches = [1, 2] if tiny else [1, 2, 16]
    dtypes = [torch.float32, torch.bfloat16] if tiny else list(DTYPES.values())
    c, g = (8, 4) if tiny else (64, 32)
    out: list[dict] = []
    for dt in dtypes:
        for fmt in ("nchw", "cl"):
            for n in batches:
                for hw in hws:
                    for act in (None, "silu", "relu"):
                        if ctx["deadline"] < time.time():
                            return {"cases": out, "truncated": True}
                        x = offcenter((n, c, *hw), dt, device, n + hw[0], fmt=fmt)
                        w = offcenter((c,), torch.float32, device, 1, 1.0, 0.5)
                        b = offcenter((c,), torch.float32, device, 2, 0.0, 0.5)
                        r = _compare(
                            lambda backend, x, w, b, act=act: NF.group_norm(
                                x, g, w, b, act=act, backend=backend
                            ),
                            {"x": x, "w": w, "b": b}, dt, device,
                        )  # fmt: skip
                        out.append({"op": "group_norm", "shape": [n, c, *hw], "dtype": str(dt),
                                    "layout": fmt, "act": act} | r)  # fmt: skip
        shape3 = (2, c, 3, 4, 5) if tiny else (2, c, 16, 32, 32)
        for fmt in ("nchw", "cl"):
            x = offcenter(shape3, dt, device, 9, fmt=fmt)
            w = offcenter((c,), torch.float32, device, 1, 1.0, 0.5)
            r = _compare(lambda backend, x, w: NF.group_norm(x, g, w, w, backend=backend),
                         {"x": x, "w": w}, dt, device)  # fmt: skip
            out.append({"op": "group_norm", "shape": list(shape3), "dtype": str(dt),
                        "layout": fmt} | r)  # fmt: skip
        shape = (2, c, 5, 3) if tiny else (4, 256, 32, 32)
        x = offcenter(shape, dt, device, 3, fmt="cl")
        cc = shape[1]
        w = offcenter((cc,), torch.float32, device, 1, 1.0, 0.5)
        b = offcenter((cc,), torch.float32, device, 2, 0.0, 0.5)
        rm = offcenter((cc,), torch.float32, device, 3, 3.0, 1.0)
        rv = offcenter((cc,), torch.float32, device, 4, 4.0, 0.5).abs()
        tau = offcenter((cc,), torch.float32, device, 5, -0.2, 0.3)
        cases = {
            "frozen_batch_norm": (lambda backend, x, w, b, rm=rm, rv=rv: NF.frozen_batch_norm(
                x, w, b, rm, rv, act="relu", backend=backend), {"x": x, "w": w, "b": b}),
            "frn_tlu": (lambda backend, x, w, b, tau: NF.frn_tlu(x, w, b, tau, backend=backend),
                        {"x": x, "w": w, "b": b, "tau": tau}),
        }  # fmt: skip
        for name, (fn, ts) in cases.items():
            out.append(
                {"op": name, "shape": list(shape), "dtype": str(dt)} | _compare(fn, ts, dt, device)
            )
        mw = offcenter((3,), torch.float32, device, 6, 0.0, 0.5)
        vw = offcenter((3,), torch.float32, device, 7, 0.0, 0.5)
        for training in (True, False):
            runs = {}
            for be in ("triton", "torch"):
                rm_b, rv_b = rm.clone(), rv.clone()
                xx = x if be == "triton" else x.double()
                NF.switchable_norm(xx, mw, vw, w, b, running_mean=rm_b, running_var=rv_b,
                                   training=training, backend=be)  # fmt: skip
                runs[be] = (rm_b, rv_b)

            def sn(backend, x, mw, vw, w, b, t=training, rm=rm, rv=rv):
                return NF.switchable_norm(
                    x, mw, vw, w, b, running_mean=rm.clone(), running_var=rv.clone(),
                    training=t, backend=backend,
                )  # fmt: skip

            r = _compare(sn, {"x": x, "mw": mw, "vw": vw, "w": w, "b": b}, dt, device)
            r["errors"]["running_mean"] = _rel(runs["triton"][0], runs["torch"][0])
            r["errors"]["running_var"] = _rel(runs["triton"][1], runs["torch"][1])
            out.append({"op": "switchable_norm", "training": training, "shape": list(shape),
                        "dtype": str(dt)} | r)  # fmt: skip
    return {"cases": out, "all_ok": all(c["ok"] for c in out)}


def _grads_once(device: str, ctx: dict) -> list[torch.Tensor]:
    shape = (2, 8, 5, 3) if ctx["tiny"] else (2, 640, 32, 32)
    x = offcenter(shape, torch.float32, device, 11, fmt="cl").requires_grad_()
    w = offcenter((shape[1],), torch.float32, device, 1, 1.0, 0.5).requires_grad_()
    res = []
    for fn in (
        lambda: NF.group_norm(x, 4 if ctx["tiny"] else 32, w, w, act="silu", backend="triton"),
        lambda: NF.frn_tlu(x, w, w, w, backend="triton"),
        lambda: NF.switchable_norm(x, w[:3], w[:3], w, w, backend="triton"),
    ):
        y = fn()
        res += [y, *torch.autograd.grad(y, [x, w], torch.ones_like(y))]
    return res


def section_determinism(device: str, ctx: dict) -> dict:
    runs = [_grads_once(device, ctx) for _ in range(3)]
    same = all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r, strict=True))
    return {"bitwise_equal_over_3_runs": same}


def section_big(device: str, ctx: dict) -> dict:
    if ctx["tiny"] or device != "cuda":
        return {"skipped": "needs a GPU (a tensor over 2**31 elements)"}
    shape = (1, 32, 2**26 + 7)  # 2**31 + 224 elements, fp16: 4 GiB
    x = offcenter((1, 32, 1024), torch.float16, device, 3).repeat(1, 1, 2**16)
    x = torch.cat([x, x[..., :7]], dim=-1)
    assert tuple(x.shape) == shape and x.numel() > 2**31
    y = NF.group_norm(x, 8, backend="triton")
    ref = NF.group_norm(x[..., :1024].float(), 8, backend="torch")
    err = _rel(y[..., :1024], ref)
    tail = _rel(y[..., -7:], ref[..., :7])
    return {"numel": x.numel(), "rel_err_head": err, "rel_err_tail": tail,
            "ok": max(err, tail) < 1e-2}  # fmt: skip


def section_graph(device: str, ctx: dict) -> dict:
    if device != "cuda":
        return {"skipped": "CUDA graphs need a GPU"}
    x = offcenter((2, 256, 32, 32), torch.float32, device, 4).requires_grad_()
    w = offcenter((256,), torch.float32, device, 1, 1.0, 0.5).requires_grad_()
    dy = torch.randn_like(x)
    step = lambda: torch.autograd.grad(NF.group_norm(x, 32, w, w, backend="triton"), [x, w], dy)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    graph.replay()
    torch.cuda.synchronize()
    want = step()
    return {"ok": all(torch.equal(a, b) for a, b in zip(out, want, strict=True))}


def section_speed(device: str, ctx: dict) -> dict:
    tiny = ctx["tiny"]
    shapes = [(2, 32, 4, 4)] if tiny else SPEED_SHAPES
    providers = ["normlab-triton", "torch"] if tiny else None
    reps = 2 if tiny else 30
    out: list[dict] = []
    for dname in ["float32"] if tiny else ["bfloat16", "float32"]:
        for shape in shapes:
            if ctx["deadline"] < time.time():
                return {"records": out, "truncated": True}
            layouts = ("nchw", "nhwc") if len(shape) == 4 else ("nchw",)
            recs = bench_kernels([shape], providers=providers, dtype=DTYPES[dname], device=device,
                                 layers=["GroupNorm(32)"] if tiny else None,
                                 layouts=("nhwc",) if tiny else layouts, reps=reps,
                                 warmup=1 if tiny else 5, progress=ctx["log"])  # fmt: skip
            for r in recs:
                out.append(vars(r) | {"regime": measured.regime_of(shape)})
            ctx["flush"]()
    return {"records": out}


SECTIONS = {
    "env": (section_env, 30),
    "correctness": (section_correctness, 120),
    "determinism": (section_determinism, 30),
    "big_tensor": (section_big, 60),
    "cuda_graph": (section_graph, 30),
    "speed": (section_speed, 210),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--tiny", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections")
    args = ap.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --tiny on CPU", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.ctime()}

    def flush() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    signal.signal(signal.SIGALRM, _alarm)
    for name in args.only or list(SECTIONS):
        fn, budget = SECTIONS[name]
        t0 = time.time()
        ctx = {"tiny": args.tiny, "deadline": t0 + 0.9 * budget, "flush": flush,
               "log": lambda m: print(f"  {m}", flush=True)}  # fmt: skip
        print(f"[{name}] (at most {budget} s)", flush=True)
        signal.alarm(budget)
        try:
            result[name] = fn(device, ctx)
        except (Timeout, Exception) as e:  # a failing section never loses the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        finally:
            signal.alarm(0)
        result[name + "_seconds"] = round(time.time() - t0, 1)
        flush()
    print(f"gpu_check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
