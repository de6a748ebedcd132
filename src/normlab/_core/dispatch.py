"""Which implementation runs an op: a Triton kernel, a fused Function or plain autograd.

One decision, made here for every functional op by :func:`choose_path`, from a
table (:data:`OP_PATHS`: which paths each op has, and why the others are missing),
the input, the ``backend=`` argument, the process group and the context
(``torch.compile``, export, ``torch.func`` transforms, tensor subclasses):
:attr:`Path.TRITON` (:mod:`normlab.kernels`), :attr:`Path.FUSED` (a hand-written CPU
autograd.Function, :mod:`normlab._core.fused`) or :attr:`Path.AUTOGRAD` (plain torch).

Safe by default: ``backend="auto"`` takes the kernels only where a recorded GPU
measurement enables them (:mod:`normlab._core.measured`, empty today) or where the
user opted in with ``NORMLAB_TRITON=1``; ``NORMLAB_TRITON=0`` turns them off
everywhere. This module is the one place that reads that variable
(:func:`triton_switch`). Whether the kernels can run on this machine
(:func:`available`, :func:`missing`, :func:`auto_blocker`) is decided here too,
without importing triton until it is asked.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import measured
from .checks import BACKENDS
from .fused import eager_plain, fused_allowed

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "OP_PATHS",
    "TRITON_TESTED",
    "Op",
    "OpPaths",
    "Path",
    "auto_blocker",
    "available",
    "check_backend",
    "choose_path",
    "interpreting",
    "missing",
    "resolve_backend",
    "triton_switch",
    "triton_version",
]


class Path(Enum):
    """An implementation of an op."""

    TRITON = "triton"
    FUSED = "fused"
    AUTOGRAD = "autograd"


class Op(str, Enum):
    """The ops that the functionals dispatch; the value is the op's identifier."""

    BATCH_NORM = "batch_norm"
    BATCH_NORM_EVAL = "batch_norm_eval"
    FROZEN_BATCH_NORM = "frozen_batch_norm"
    BATCH_RENORM = "batch_renorm"
    BATCH_RENORM_EVAL = "batch_renorm_eval"
    MOVING_AVERAGE_BATCH_NORM = "moving_average_batch_norm"
    MOVING_AVERAGE_BATCH_NORM_EVAL = "moving_average_batch_norm_eval"
    CROSS_ITERATION_BATCH_NORM = "cross_iteration_batch_norm"
    CROSS_ITERATION_BATCH_NORM_EVAL = "cross_iteration_batch_norm_eval"
    GROUP_NORM = "group_norm"
    INSTANCE_NORM = "instance_norm"
    LAYER_NORM = "layer_norm"
    LAYER_NORM2D = "layer_norm2d"
    LOCAL_RESPONSE_NORM = "local_response_norm"
    RMS_NORM = "rms_norm"
    RMS_NORM2D = "rms_norm2d"
    SWITCHABLE_NORM = "switchable_norm"
    FILTER_RESPONSE_NORM = "filter_response_norm"
    FRN_TLU = "frn_tlu"
    TLU = "tlu"
    EVONORM_B0 = "evonorm_b0"
    EVONORM_S0 = "evonorm_s0"


class OpPaths(NamedTuple):
    """Which paths an op has. ``label`` names the op in error messages; each other
    field is None where the op has that path, or the reason it has not."""

    label: str
    triton: str | None
    fused: str | None
    autograd: str | None = None


_NO_KERNEL = "normlab ships no Triton kernel for it"
_NATIVE = "torch's own kernel already computes it in one or two passes"
_ELEMENTWISE = "it is one elementwise pass with fixed statistics"
_ONLY_AUTOGRAD = "its plain ops already save no full-size intermediate"

OP_PATHS: dict[Op, OpPaths] = {
    Op.BATCH_NORM: OpPaths(
        "batch_norm",
        "only eval mode (training=False: running statistics) has a Triton kernel",
        _NATIVE,
    ),
    Op.BATCH_NORM_EVAL: OpPaths("batch_norm (eval)", None, _ELEMENTWISE),
    Op.FROZEN_BATCH_NORM: OpPaths("frozen_batch_norm", None, _ELEMENTWISE),
    Op.BATCH_RENORM: OpPaths("batch_renorm", _NO_KERNEL, None),
    Op.BATCH_RENORM_EVAL: OpPaths("batch_renorm", _NO_KERNEL, _ELEMENTWISE),
    Op.MOVING_AVERAGE_BATCH_NORM: OpPaths(
        "moving_average_batch_norm",
        _NO_KERNEL,
        None,
        "its backward writes the ψ moving-average window in place (a stateful "
        "autograd.Function that functorch cannot batch or differentiate twice). Use "
        "training=False / .eval() (running_var only), train the layer without the "
        "transform, or use a batch-independent norm (GroupNorm, FilterResponseNorm) "
        "for per-sample gradients and model ensembles.",
    ),
    Op.MOVING_AVERAGE_BATCH_NORM_EVAL: OpPaths(
        "moving_average_batch_norm", _NO_KERNEL, _ELEMENTWISE
    ),
    Op.CROSS_ITERATION_BATCH_NORM: OpPaths(
        "cross_iteration_batch_norm",
        _NO_KERNEL,
        "its statistics need the gradients of the batch moments with respect to the "
        "preceding convolution's weight, which plain autograd computes",
    ),
    Op.CROSS_ITERATION_BATCH_NORM_EVAL: OpPaths(
        "cross_iteration_batch_norm", _NO_KERNEL, _ELEMENTWISE
    ),
    Op.GROUP_NORM: OpPaths("group_norm", None, _NATIVE),
    Op.INSTANCE_NORM: OpPaths("instance_norm", _NO_KERNEL, _NATIVE),
    Op.LAYER_NORM: OpPaths("layer_norm", _NO_KERNEL, _NATIVE),
    Op.LAYER_NORM2D: OpPaths("layer_norm2d", _NO_KERNEL, _NATIVE),
    Op.LOCAL_RESPONSE_NORM: OpPaths("local_response_norm", _NO_KERNEL, _ONLY_AUTOGRAD),
    Op.RMS_NORM: OpPaths("rms_norm", _NO_KERNEL, _ONLY_AUTOGRAD),
    Op.RMS_NORM2D: OpPaths("rms_norm2d", _NO_KERNEL, _ONLY_AUTOGRAD),
    Op.SWITCHABLE_NORM: OpPaths("switchable_norm", None, None),
    Op.FILTER_RESPONSE_NORM: OpPaths("filter_response_norm", None, None),
    Op.FRN_TLU: OpPaths("frn_tlu", None, None),
    Op.TLU: OpPaths("tlu", _NO_KERNEL, _ELEMENTWISE),
    Op.EVONORM_B0: OpPaths("evonorm_b0", _NO_KERNEL, None),
    Op.EVONORM_S0: OpPaths("evonorm_s0", _NO_KERNEL, None),
}
"""Every dispatched op and its paths. An op gains a path in the same change that
wires its functional to the implementation."""

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The triton versions the kernels are tested with: ``lo <= version < hi``.
TRITON_TESTED = ((3, 6), (3, 9))
#: The least CUDA compute capability ``auto`` sends to the kernels (Ampere).
_MIN_CAPABILITY = (8, 0)
_SWITCH = "NORMLAB_TRITON"


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_switch() -> bool | None:
    """``NORMLAB_TRITON``: True for "1" (``auto`` takes the kernels wherever they can
    run), False for "0" (no kernels anywhere), None when unset or empty (``auto``
    follows the measurement table). Any other value is a ValueError."""
    value = os.environ.get(_SWITCH, "")
    if value in ("", "0", "1"):
        return None if value == "" else value == "1"
    raise ValueError(
        f"{_SWITCH}={value!r} is not understood: set it to 1 (backend='auto' uses the "
        "Triton kernels wherever they can run), 0 (never use them) or leave it unset "
        "(auto uses them only where a recorded GPU measurement enables them)."
    )


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed triton (imports it)."""
    import triton

    parts = re.findall(r"\d+", triton.__version__)[:2]
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)


def _version_problem() -> str | None:
    (lo, hi), v = TRITON_TESTED, triton_version()
    if lo <= v < hi:
        return None
    return (
        f"triton {v[0]}.{v[1]} is installed and the kernels are tested with triton "
        f">= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; install a tested triton"
    )


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda(x: Any) -> bool:
    return bool(x.is_cuda)


def _rocm() -> bool:
    return torch.version.hip is not None


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


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
    if x is not None and not _is_cuda(x) and not interpreting():
        return (
            f"the input is on {x.device.type}, and the kernels run on CUDA tensors (or on "
            "CPU tensors only in Triton's interpreter, set TRITON_INTERPRET=1 before "
            "triton is imported; for tests); move the input to a CUDA device"
        )
    if x is None and not _cuda_available() and not interpreting():
        return "there is no CUDA device and TRITON_INTERPRET is not '1'"
    return _version_problem()


def auto_blocker(x: Tensor, *tensors: Tensor | None) -> str | None:
    """Why ``backend="auto"`` cannot send the CUDA tensor ``x`` to a kernel here, or
    None: the guards of the fused path (:func:`normlab._core.fused.eager_plain`), ONNX
    export, an NVIDIA GPU of compute capability 8.0 or more, a tested triton."""
    if torch.onnx.is_in_onnx_export():
        return "ONNX export (ONNX has no Triton ops)"
    if not eager_plain(x, *tensors):
        return "compile, export, torch.func, forward AD, TorchScript or a tensor subclass"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype}"
    if not available():
        return missing(x) or "the kernels cannot run here"
    if _rocm():
        return "a ROCm build of torch (the kernels are tested on NVIDIA GPUs only)"
    if _capability(x.device) < _MIN_CAPABILITY:
        return "a GPU below compute capability 8.0"
    return _version_problem()


def check_backend(label: str, backend: str) -> None:
    """Refuse a ``backend=`` value other than "auto", "torch" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"{label}: backend must be one of {BACKENDS}, got {backend!r}.")


def _lookup(op: Op | str) -> tuple[Op, OpPaths]:
    try:
        return Op(op), OP_PATHS[Op(op)]
    except ValueError:
        raise ValueError(
            f"unknown op {op!r}; the dispatched ops are {[o.value for o in Op]}."
        ) from None


def _triton(
    op: Op, paths: OpPaths, x: Any, backend: str, group: ProcessGroup | None, tensors: tuple
) -> bool:
    """The Triton part of :func:`choose_path` (reads only ``x.is_cuda`` of a CPU input
    unless the kernels were requested)."""
    label = paths.label
    if backend == "torch":
        return False
    switch = triton_switch()
    if backend == "auto":
        if switch is False or not _is_cuda(x) or paths.triton is not None or group is not None:
            return False
        if auto_blocker(x, *tensors) is not None:
            return False
        return switch is True or measured.lookup(op.value, x) is not None
    if paths.triton is not None:
        raise RuntimeError(
            f"{label}: backend='triton' was requested, but {paths.triton}. Use "
            "backend='auto' or backend='torch'."
        )
    if switch is False:
        raise RuntimeError(
            f"{label}: backend='triton' was requested, but {_SWITCH}=0 turns the Triton "
            f"kernels off. Unset {_SWITCH} (or set it to 1), or use backend='torch'."
        )
    why_not = missing(x)
    if why_not is not None:
        raise RuntimeError(
            f"{label}: backend='triton' was requested, but {why_not}. Or use backend='auto' "
            "(torch unless a measurement or NORMLAB_TRITON=1 enables the kernels) or "
            "backend='torch'."
        )
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"{label}: backend='triton' cannot run under torch.func transforms (vmap, grad, "
            "...): its autograd.Function has no vmap rule. Use backend='torch' there."
        )
    if group is not None:
        raise RuntimeError(
            f"{label}: backend='triton' computes local statistics only, but a "
            "process_group asks for cross-process BN statistics; use backend='auto' "
            "or 'torch' with process_group, or drop process_group."
        )
    return True


def choose_path(
    op: Op | str,
    x: Tensor,
    backend: str,
    group: ProcessGroup | None,
    *tensors: Tensor | None,
    constants: Sequence[Tensor | None] = (),
) -> Path:
    """The implementation of ``op`` for input ``x``: the one dispatch decision.

    Args:
        op: an :class:`Op` (or its identifier).
        x: the input.
        backend: "auto", "torch" or "triton" (the functional's ``backend=``).
        group: the resolved process group of a synchronized call, or None.
        tensors: the op's other tensors (parameters, buffers); a tensor subclass
            among them keeps the plain path, as for ``x``.
        constants: tensors the fused Function treats as constants (running
            statistics): if one requires grad, only plain autograd gives it one.

    Decision:

    * :attr:`Path.TRITON` for ``backend="auto"`` when ``x`` is a CUDA tensor, the op
      has a kernel, there is no process group (the kernels compute local
      statistics), :func:`auto_blocker` finds nothing in the way (the fused path's
      guards, ONNX export, dtype, NVIDIA sm_80+, a tested triton) and either
      :func:`normlab._core.measured.lookup` finds a recorded measurement for the
      op, dtype, layout and shape regime or ``NORMLAB_TRITON=1``. Never with
      ``NORMLAB_TRITON=0``. CPU input never takes it under "auto", even with
      ``TRITON_INTERPRET=1``, and then triton is not imported.
      ``backend="triton"`` takes it or raises a RuntimeError that names what is
      missing (with :data:`OP_PATHS`'s reason).
    * :attr:`Path.FUSED` where the op has a fused Function, there is no process
      group, no constant requires grad, and
      :func:`normlab._core.fused.fused_allowed` holds (eager CPU, non-empty, no
      compile/export/trace/functorch/forward AD, no tensor subclass). An op
      whose fused Function is its only path (:attr:`OpPaths.autograd` set) always
      takes it, and refuses ``torch.func`` transforms with that reason.
    * :attr:`Path.AUTOGRAD` otherwise.
    """
    key, paths = _lookup(op)
    check_backend(paths.label, backend)
    if _triton(key, paths, x, backend, group, (*tensors, *constants)):
        return Path.TRITON
    if paths.autograd is not None:
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"{paths.label} (training): cannot run under torch.func transforms (vmap, "
                f"grad, jacrev, ...) because {paths.autograd}"
            )
        return Path.FUSED
    if (
        paths.fused is None
        and group is None
        and not any(t is not None and t.requires_grad for t in constants)
        and fused_allowed(x, *tensors, *constants)
    ):
        return Path.FUSED
    return Path.AUTOGRAD


def resolve_backend(op: Op | str, backend: str, x: Tensor) -> str:
    """``"triton"`` where :func:`choose_path` would take the kernels, else ``"torch"``.

    The backend half of the decision alone (no process group), for callers that
    only ask whether the kernels run.
    """
    key, paths = _lookup(op)
    check_backend(paths.label, backend)
    return "triton" if _triton(key, paths, x, backend, None, ()) else "torch"
