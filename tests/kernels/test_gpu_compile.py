"""Every kernel compiles for sm_90 with triton's bundled ptxas, without a GPU.

The interpreter runs the kernels' Python; it does not check what only the compiler
checks (constexpr rules, types of loop-carried values, lowering). This test runs
``_compile_check.py`` in a subprocess without ``TRITON_INTERPRET``: every launch the
entry points make is specialized and compiled to a cubin, never launched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _kernel_cases import requires_kernels

requires_kernels()

KERNELS = {
    "_group_norm_fwd_stats",
    "_group_norm_fwd",
    "_group_norm_bwd_stats",
    "_group_norm_bwd_dx",
    "_group_norm_bwd_dwdb",
    "_group_norm_packed_fwd_stats",
    "_group_norm_packed_fwd",
    "_group_norm_packed_bwd",
    "_frozen_bn_fwd",
    "_frozen_bn_bwd",
    "_frozen_bn_bwd_dwdb",
    "_frn_fwd_stats",
    "_frn_fwd",
    "_frn_bwd_stats",
    "_frn_bwd_dx",
    "_frn_bwd_dwdb",
    "_switchable_norm_fwd_stats",
    "_switchable_norm_fwd_merge",
    "_switchable_norm_fwd",
    "_switchable_norm_bwd_stats",
    "_switchable_norm_bwd_merge",
    "_switchable_norm_bwd_dx",
}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_compile_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200
    )
    if proc.returncode == 3:
        pytest.skip(f"triton internals changed: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["compiled"]) == KERNELS
