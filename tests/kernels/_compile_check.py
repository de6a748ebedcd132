"""Compile every kernel for an NVIDIA GPU on a machine without one; print JSON.

Run as a script, *without* ``TRITON_INTERPRET=1`` (the kernels must be JIT functions,
not interpreted ones). A stand-in driver reports a CUDA target (default sm_90, the
H100) and ``JITFunction.run`` is forced into warm-up mode: each launch of the kernel
entry points specializes and compiles the kernel through TTIR, TTGIR, LLVM IR and PTX to
a cubin with triton's bundled ptxas, and never launches it. CPU tensors stand in for
the arguments. This catches what the interpreter lets through (constexpr rules, types
of loop-carried values, unsupported ops), not numerical errors.

Uses triton internals (``driver.set_active``, ``JITFunction.run``); exits with code 3
when they are not as expected, so the calling test can skip.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import torch

    try:
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        orig_run = JITFunction.run
    except (ImportError, AttributeError) as e:
        print(f"triton internals changed: {e}", file=sys.stderr)
        return 3
    arch = int(os.environ.get("NORMLAB_COMPILE_ARCH", "90"))

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    compiled: dict[str, int] = {}

    def run(self, *args, grid, warmup, **kwargs):
        compiled[self.fn.__name__] = compiled.get(self.fn.__name__, 0) + 1
        return orig_run(self, *args, grid=grid, warmup=True, **kwargs)

    driver.set_active(StandInDriver())
    JITFunction.run = run

    from normlab.kernels import (
        _common,
        fused_filter_response_norm,
        fused_frozen_batch_norm,
        fused_group_norm,
        fused_switchable_norm,
    )

    def calls(dtype: torch.dtype, cl: bool, shape: tuple[int, ...], groups: int) -> None:
        c = shape[1]
        x = torch.randn(*shape, dtype=dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        w = torch.ones(c, requires_grad=True)
        b = torch.zeros(c, requires_grad=True)
        rm, rv = torch.zeros(c), torch.ones(c)
        tau = torch.zeros(c, requires_grad=True)
        eps = torch.tensor(1e-3, requires_grad=True)
        logits = torch.zeros(3, requires_grad=True)
        for y in (
            fused_group_norm(x, groups, w, b, act="silu"),
            fused_group_norm(x, groups, None, None),
            fused_frozen_batch_norm(x, w, b, rm, rv, act="relu"),
            fused_frozen_batch_norm(x, w.detach(), b.detach(), rm, rv),
            fused_filter_response_norm(x, w, b, eps, tau=tau),
            fused_switchable_norm(x, logits, logits, w, b, running_mean=rm, running_var=rv),
        ):
            y.sum().backward()

    # Small tiles: the multi-tile loops and the H·W-split kernels.
    _common.INTERPRET_TILE = 16
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            calls(dtype, cl, (1, 4, 7, 5), 2)
    calls(torch.float32, True, (1, 15, 7, 5), 3)  # channels_last, 3 groups per program, split
    # The GPU tile size on a larger shape: the block shapes a GPU will compile.
    _common.INTERPRET_TILE = _common.TILE
    calls(torch.float16, True, (2, 64, 16, 16), 8)
    calls(torch.float32, False, (2, 64, 16, 16), 8)
    calls(torch.bfloat16, True, (2, 320, 8, 8), 32)  # C/G = 10: several groups per program
    print(json.dumps({"arch": arch, "compiled": compiled}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
