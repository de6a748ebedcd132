"""Device names given on the command line, checked before any work starts.

``torch.device("gpu")`` raises deep inside the first tensor move, and a CUDA device on
a machine without one fails only when the first model is built; both are caught here
with a message that says what to pass instead.
"""

from __future__ import annotations

import torch

__all__ = ["check_device"]

_KNOWN = "cpu, cuda, cuda:N (an NVIDIA or AMD GPU) or mps (Apple silicon)"


def check_device(device: str) -> str:
    """Return ``device`` unchanged if torch can use it here, else raise a ``ValueError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use {_KNOWN}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = torch.version.cuda or torch.version.hip
            raise ValueError(
                f"device {device!r} requested but torch sees no CUDA GPU (torch "
                f"{torch.__version__}, {'built for GPU ' + build if build else 'a CPU-only build'}"
                "); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {device!r}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r}: torch sees no Apple MPS device; use cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported here; use {_KNOWN}")
    return device
