"""Preparing a lab split's tensors the same way in every process: :func:`standardize`
(per-channel statistics on one torch thread) and :func:`data_hash` (the bits that came
out, named in every run's protocol).

Both the classification split (:mod:`normlab.lab.data.images`) and the segmentation splits
(:mod:`normlab.lab.data.scenes`) go through :func:`standardize`.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["data_hash", "one_thread", "standardize"]

_THREADS = threading.RLock()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread; the previous thread count is restored after.

    torch's thread count is per process, so the scope is held by one Python thread at a
    time.
    """
    with _THREADS:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def standardize(
    x_train: torch.Tensor, x_test: torch.Tensor, stat_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets standardized per channel with the training set's mean and std, computed in
    ``stat_dtype``; returned as contiguous float32.

    A reduction's rounding depends on how many threads share it, so the statistics are
    computed on one torch thread, always: the result is the same bits in the parent
    process (any thread count) and in a one-thread worker, and equals what a one-thread
    process computed before this scope existed.
    """
    with one_thread():
        ref = x_train.to(stat_dtype)
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)
        std = ref.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        return (
            ((x_train - mean) / std).float().contiguous(),
            ((x_test - mean) / std).float().contiguous(),
        )


def data_hash(split: object) -> str:
    """Short sha256 (16 hex digits) of a prepared split's tensors (``x_train``,
    ``y_train``, ``x_test``, ``y_test``: dtype, shape and bytes).

    It goes into every run's protocol, so that a store never pools runs trained on two
    variants of the data (another normlab, torch or data file) as if they were one.
    """
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        t = getattr(split, name).detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
