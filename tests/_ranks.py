"""Two gloo ranks as spawned processes, for the data-parallel tests.

Imported as ``from _ranks import ...`` (pytest puts tests/ on sys.path, see pyproject).
A rank's target is called as ``target(rank, port, results, *args)`` and puts
``(rank, "ok", payload)`` or ``(rank, "error", traceback)`` on ``results``.
"""

from __future__ import annotations

import queue
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    target: Callable[..., None], *args: Any, world: int = 2, timeout: float = 120
) -> dict[int, Any]:
    """Each rank's payload; a rank that fails or hangs past ``timeout`` s fails the test."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=target, args=(r, port, results, *args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < world:
            try:
                rank, status, payload = results.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"a rank hung (no result within {timeout:g} s)")
            if status != "ok":
                pytest.fail(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return got
