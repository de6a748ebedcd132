"""Which implementation runs an op: the Triton kernels or PyTorch.

One decision, made here for every functional op: :func:`resolve_backend` answers
``"torch"`` or ``"triton"`` from the op, the ``backend=`` argument and the input.
Whether the kernels can run on this machine (:func:`available`, :func:`missing`) is
decided here too, without importing triton until it is asked.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .checks import BACKENDS

__all__ = ["TRITON_OPS", "available", "interpreting", "missing", "resolve_backend"]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def available() -> bool:
    """Whether the kernels can run here: triton imports, and there is a CUDA device or
    the interpreter is on (``TRITON_INTERPRET=1``). Imports triton on the first call."""
    return _triton_importable() and (_cuda_available() or interpreting())


def missing(x: Tensor | None = None) -> str | None:
    """Why the kernels cannot run on ``x`` here (a sentence with the fix), or None."""
    if not _triton_importable():
        return (
            "triton is not installed (it is an optional dependency); install it with "
            "pip install 'normlab[triton]'"
        )
    if x is not None and not x.is_cuda and not interpreting():
        return (
            f"the input is on {x.device.type}, and the kernels run on CUDA tensors (or on "
            "CPU tensors only in Triton's interpreter, set TRITON_INTERPRET=1 before "
            "triton is imported; for tests); move the input to a CUDA device"
        )
    if x is None and not _cuda_available() and not interpreting():
        return "there is no CUDA device and TRITON_INTERPRET is not '1'"
    return None


# Ops whose functional calls normlab.kernels when resolve_backend answers "triton".
# An op joins this set in the same change that wires its functional to the kernel.
TRITON_OPS = frozenset(
    {
        "group_norm",
        "batch_norm (eval)",
        "frozen_batch_norm",
        "switchable_norm",
        "filter_response_norm",
        "frn_tlu",
    }
)

# Why an op without dispatch has none, for the error message.
_NO_TRITON = {
    "batch_norm": "only eval mode (training=False: running statistics) has a Triton kernel",
}

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve_backend(op: str, backend: str, x: Tensor) -> str:
    """Pick the implementation of ``op`` for input ``x``: ``"torch"`` or ``"triton"``.

    * ``"torch"``: always the PyTorch path.
    * ``"auto"``: the Triton kernels when ``x`` is a CUDA tensor, ``op`` has them
      (:data:`TRITON_OPS`), triton imports, the dtype is supported, and the call is
      neither traced by ``torch.compile`` (inductor fuses the torch path itself),
      nor by ``torch.onnx.export`` (ONNX has no Triton ops), nor under a
      ``torch.func`` transform. Otherwise torch; CPU input is always torch,
      even with ``TRITON_INTERPRET=1`` (the interpreter is for tests), and then
      triton is not even imported.
    * ``"triton"``: the kernels, on a CUDA tensor or (for tests) a CPU tensor under
      Triton's interpreter; a RuntimeError that names what is missing otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if (
            not x.is_cuda
            or op not in TRITON_OPS
            or x.dtype not in _KERNEL_DTYPES
            or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export()
            or torch._C._are_functorch_transforms_active()
        ):
            return "torch"
        return "triton" if available() else "torch"
    if op not in TRITON_OPS:
        why = _NO_TRITON.get(op, "normlab ships no Triton kernel for it")
        raise RuntimeError(
            f"{op}: backend='triton' was requested, but {why}. Use backend='auto' or "
            "backend='torch'."
        )
    why_not = missing(x)
    if why_not is not None:
        raise RuntimeError(
            f"{op}: backend='triton' was requested, but {why_not}. Or use backend='auto' "
            "(Triton on CUDA when it can, torch otherwise) or backend='torch'."
        )
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"{op}: backend='triton' cannot run under torch.func transforms (vmap, grad, "
            "...): its autograd.Function has no vmap rule. Use backend='torch' there."
        )
    return "triton"
