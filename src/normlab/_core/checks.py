"""Input validation shared by the functional ops.

Every message says what is wrong, why it matters, and how to fix it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

SMALL_BATCH_ALTERNATIVES = (
    "GroupNorm (normlab.nn.GroupNorm), FilterResponseNorm, FrozenBatchNorm "
    "(running statistics only), BatchNorm in eval mode with recalibrated statistics, "
    "or a bigger batch"
)

BACKENDS = ("auto", "torch", "triton")


def check_tensor(layer: str, x: object) -> None:
    """Refuse an input that is not a torch.Tensor (a NumPy array, a list, a number)."""
    if isinstance(x, (Tensor, torch.fx.Proxy)):  # a Proxy: torch.fx tracing decides
        return
    kind = type(x)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    if kind.__module__ == "numpy" or hasattr(kind, "__array__"):
        fix = "convert it first with torch.from_numpy(x) (or torch.as_tensor(x))"
    else:
        fix = "convert it first with torch.tensor(x) or torch.as_tensor(x)"
    raise TypeError(f"{layer}: expects a torch.Tensor, got {name}; {fix}.")


def check_count(layer: str, name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: a number of channels, groups, a window size.

    Refuses ``bool``, ``float`` (even 8.0), ``str`` and other non-integers with a
    TypeError, instead of rounding silently or failing deep inside torch; accepts
    any integer type (``int``, NumPy integers, 0-dim integer tensors).
    """
    if isinstance(value, bool) or isinstance(value, (float, str)):
        integer = None
    else:
        try:
            integer = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            integer = None
    if integer is None:
        text = isinstance(value, str) and value.strip().lstrip("+-").isdigit()
        hint = f"{name}=int({value!r})" if text else f"a whole number for {name}"
        raise TypeError(
            f"{layer}: {name} must be an int, got {type(value).__name__} {value!r}; pass {hint}."
        )
    if integer < minimum:
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {integer}.")
    return integer


def check_shape(layer: str, name: str, value: object) -> tuple[int, ...]:
    """A shape given as one int or a sequence of ints (``normalized_shape``), as a tuple.

    Each entry goes through :func:`check_count`; a string is refused, not read as
    a sequence of characters.
    """
    if isinstance(value, (list, tuple, torch.Size)):
        if not value:
            raise ValueError(f"{layer}: {name} must name at least one dim, got {value!r}.")
        return tuple(check_count(layer, f"{name}[{i}]", v) for i, v in enumerate(value))
    return (check_count(layer, name, value),)


def check_floating(layer: str, x: Tensor) -> None:
    check_tensor(layer, x)
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{layer}: expected a floating-point input, got dtype {x.dtype} with shape "
            f"{tuple(x.shape)}. Normalization divides by a standard deviation; convert "
            "first, e.g. x.float()."
        )


class NormShapeError(ValueError, RuntimeError):
    """A tensor's shape does not fit the norm: wrong channel count, parameter or buffer size.

    Derives from both ValueError (normlab's type for bad arguments) and
    RuntimeError (what torch raises for the same mismatches), so code written
    against either keeps catching it.
    """

    __module__ = "normlab"


def check_eps(layer: str, eps: float, *, zero_ok: bool = False) -> None:
    """Refuse a negative, NaN or infinite eps (and 0 unless ``zero_ok``).

    ``zero_ok`` is for the layers whose torch twin accepts eps=0 (GroupNorm,
    LayerNorm, InstanceNorm, BatchNorm outside training): a constant group then
    divides by zero, as in torch.
    """
    bad = not math.isfinite(eps) or eps < 0 or (eps == 0 and not zero_ok)
    if bad:
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(
            f"{layer}: eps must be {bound} and finite, got {eps}. eps keeps "
            "1/sqrt(var + eps) finite when a group is constant; use e.g. eps=1e-5."
        )


def check_rank(layer: str, x: Tensor, ranks: Sequence[int], layout: str) -> None:
    check_tensor(layer, x)
    if x.dim() not in ranks:
        allowed = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(
            f"{layer}: expected a {allowed} input ({layout}), got a {x.dim()}-D input of "
            f"shape {tuple(x.shape)}."
        )


#: How :func:`check_min_dims` names the layout it expects, by the least number of dims.
_AT_LEAST = {
    2: "an (N, C, *spatial) input with at least 2 dims",
    3: "an (N, C, *spatial) input with at least one spatial dim",
}


def check_min_dims(layer: str, x: Tensor, min_dims: int, expected: str | None = None) -> None:
    """Refuse an input with fewer than ``min_dims`` dims (N, C and the spatial dims needed).

    ``expected`` names the accepted layout in the message (default: the
    ``(N, C, *spatial)`` wording for ``min_dims`` 2 or 3).
    """
    check_tensor(layer, x)
    if x.dim() < min_dims:
        what = _AT_LEAST[min_dims] if expected is None else expected
        raise ValueError(f"{layer}: expected {what}, got shape {tuple(x.shape)}.")


def check_norm_input(
    layer: str,
    x: Tensor,
    eps: float,
    min_dims: int,
    expected: str | None = None,
    *,
    zero_ok: bool = False,
) -> None:
    """The preamble of a functional norm: a floating-point tensor, a valid eps, enough dims.

    :func:`check_floating`, :func:`check_eps` (``zero_ok`` as there) and
    :func:`check_min_dims` (``min_dims``, ``expected`` as there), in that order, so
    the first problem found is the one reported.
    """
    check_floating(layer, x)
    check_eps(layer, eps, zero_ok=zero_ok)
    check_min_dims(layer, x, min_dims, expected)


def check_normalized_shape(layer: str, x: Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a ``normalized_shape`` that is not the last ``len(shape)`` dims of ``x``."""
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k :]) != shape:
        raise NormShapeError(
            f"{layer}: normalized_shape={list(shape)} must equal the last {k} dims of the "
            f"input, got input shape {tuple(x.shape)}. Build the layer with "
            f"normalized_shape={list(x.shape[-k:]) if k else '[...]'} or move the "
            "normalized dims last."
        )


def check_channels(layer: str, x: Tensor, num_features: int, dim: int = 1) -> None:
    if x.shape[dim] != num_features:
        raise NormShapeError(
            f"{layer}: the input has {x.shape[dim]} channels (dim {dim} of shape "
            f"{tuple(x.shape)}) but the layer was built for num_features={num_features}. "
            f"Build it with num_features={x.shape[dim]} or fix the preceding layer."
        )


def check_param(layer: str, name: str, p: Tensor | None, shape: Sequence[int]) -> None:
    if p is not None and tuple(p.shape) != tuple(shape):
        raise NormShapeError(
            f"{layer}: {name} has shape {tuple(p.shape)}, expected {tuple(shape)} "
            "(one value per normalized channel)."
        )


def check_params(layer: str, shape: Sequence[int], **params: Tensor | None) -> None:
    """:func:`check_param` for each named parameter (None: absent), in the order given."""
    for name, p in params.items():
        check_param(layer, name, p, shape)


def check_batch_count(layer: str, x: Tensor, count: int, what: str = "channel") -> None:
    """Refuse a batch variance computed from a single value."""
    if count <= 1:
        raise ValueError(
            f"{layer}: training needs more than 1 value per {what} to compute a batch "
            f"variance, but input of shape {tuple(x.shape)} gives {count}. With one value "
            "the variance is 0 and the output is 0 (or NaN for the unbiased running "
            f"variance). Use {SMALL_BATCH_ALTERNATIVES}; or call .eval() to use the "
            "running statistics."
        )


def host_checks_allowed(t: Tensor) -> bool:
    """Whether a check may read ``t``'s *value* on the host (``bool(t > 0)``).

    Only for a CPU tensor in plain eager code: on a device it is a host sync;
    under ``torch.compile`` a data-dependent branch breaks the graph; under a
    ``torch.func`` transform (vmap, grad) the value of a batched tensor cannot be
    read. Value checks are then skipped; the modules guarantee valid values by
    construction.
    """
    return (
        t.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


#: False inside :func:`stored_variance_as_nan` (the doctor's probe forward).
_REFUSE_NEGATIVE_VARIANCE: ContextVar[bool] = ContextVar("refuse_negative_variance", default=True)

_RECALIBRATE = "normlab.recalibrate.recalibrate(model, batches)"


def negative_channels(var: Tensor, limit: int = 8) -> str:
    """How many entries of ``var`` are negative, which (the first ``limit``), and the minimum."""
    channels = torch.nonzero(var.detach().reshape(-1) < 0).reshape(-1).tolist()
    shown = ", ".join(str(c) for c in channels[:limit]) + (", ..." if len(channels) > limit else "")
    return (
        f"negative in {len(channels)} of {var.numel()} channel(s) (channel(s) {shown}; "
        f"min {float(var.min()):.3g})"
    )


def stored_variance(layer: str, var: Tensor) -> Tensor:
    """``var``, a *stored* (running) variance, as a layer may normalize with it.

    A variance cannot be negative: a negative stored one means corrupt statistics
    (a damaged or edited checkpoint, a bad conversion). Clamping it to 0, as
    computed batch variances are (rounding can push an exact 0 below it), would
    divide by ``sqrt(eps)`` and silently amplify the channel up to ``1/sqrt(eps)``
    times. Where :func:`host_checks_allowed` (a CPU tensor in eager code) one
    comparison over the C values is read and a negative entry raises ValueError
    naming the channels and the fix. Elsewhere reading it would cost a host sync
    per forward (a device tensor) or break tracing (``torch.compile``,
    ``torch.export``, ``torch.func``): the negative channels become NaN instead,
    as in torch's eval BatchNorm, so the output is never silently wrong, and
    ``normlab doctor`` reports them (``running_var_negative``). While a graph is
    recorded for a file (``torch.jit.trace``, which the TorchScript ONNX exporter
    runs, or ``torch.export``, which the other one runs) ``var`` is returned as is:
    the recorded graph has torch's semantics. The eager check is one ``min`` over
    C values.
    """
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return var
    if host_checks_allowed(var) and _REFUSE_NEGATIVE_VARIANCE.get():
        if var.numel() and float(var.min()) < 0:
            raise ValueError(
                f"{layer}: running_var is {negative_channels(var)}. A variance cannot be "
                "negative: the stored statistics are corrupt (a damaged or edited checkpoint, "
                "a bad conversion), and torch's BatchNorm gives NaN there. Reload the weights "
                f"from a good checkpoint or recompute the statistics with {_RECALIBRATE}; "
                "normlab doctor lists every affected layer by module path "
                "(running_var_negative)."
            )
        return var
    return torch.where(var < 0, float("nan"), var)


@contextmanager
def stored_variance_as_nan() -> Iterator[None]:
    """Inside: :func:`stored_variance` gives NaN for negative entries instead of raising.

    For a diagnostic forward that must run through corrupt statistics to see the
    rest of the model (the doctor reports them as ``running_var_negative``).
    """
    token = _REFUSE_NEGATIVE_VARIANCE.set(False)
    try:
        yield
    finally:
        _REFUSE_NEGATIVE_VARIANCE.reset(token)


def refuse_under_transforms(layer: str, why: str, instead: str) -> None:
    """Raise a clear error for a path that cannot run under ``torch.func`` transforms."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"{layer}: cannot run under torch.func transforms (vmap, grad, jacrev, ...) "
            f"because {why}. {instead}"
        )


def divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in range(min(n, limit), 0, -1) if n % d == 0]


def check_groups(
    layer: str, num_channels: int, num_groups: int, groups_name: str = "num_groups"
) -> None:
    num_channels = check_count(layer, "num_channels", num_channels)
    num_groups = check_count(layer, groups_name, num_groups)
    if num_channels % num_groups != 0:
        options = ", ".join(str(d) for d in divisors_up_to(num_channels, num_groups)[:4])
        raise ValueError(
            f"{layer}: {num_channels} channels are not divisible by {num_groups} groups "
            f"(each group must hold the same number of channels); use num_groups= one of "
            f"{options} (divisors of {num_channels} up to {num_groups})."
        )
