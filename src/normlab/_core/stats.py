"""The statistics core: every normalization op computes its moments here.

A norm is a choice of reduction axes plus an affine map. This module owns the
first half: moments over chosen dims, with the numerics rules of
``docs/numerics.md``:

* **fp32 accumulation** for half inputs (fp64 for fp64), statistics returned in
  that accumulation dtype, never in half.
* **Stable variance.** Data are first shifted by a *pivot* (one sample of each
  reduced group, see :func:`pivot`). Subtracting a nearby value is exact in
  floating point (Sterbenz), so ``x - pivot`` keeps every significant digit of
  data such as CT intensities (mean 1e4, std 1e-2), where ``E[x²] − E[x]²`` or
  even a plain fp32 mean would lose them. Moments of the shifted data come from
  two passes on every device (the mean, then the mean square of the
  deviations: :func:`centered_moments`); then the shift is added back to the mean.
* **Variance clamped at 0** before anyone adds eps.
* **Counts**: the number of reduced elements travels with the moments, so
  callers can refuse a batch variance from a single value. An empty group (a
  process with no samples) has zero moments, still connected to the graph, so it
  contributes nothing to a cross-process merge
  (:func:`normlab._core.collectives.group_moments`, Chan's formula).

One faster path exists, for the fused CPU Functions only: :func:`one_pass_moments`
(the shifted one-pass formula, with a two-pass fallback where it would lose
precision). The reductions those Functions share (:func:`dot_sums`,
:func:`sum_of_squares`) are at the end of this module, and last
:class:`PooledMoments`, Chan's merge across batches in float64 (recalibration, doctor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .export import recording, rsqrt

__all__ = [
    "Moments",
    "acc_dtype",
    "pivot",
    "centered",
    "moments",
    "centered_moments",
    "window_mean",
    "reduced_count",
    "rstd",
    "mix_group_moments",
    "one_pass_moments",
    "union_moments",
    "mean_square",
    "NATIVE_PLANE",
    "dot_sums",
    "sum_of_squares",
    "PooledMoments",
]


class Moments(NamedTuple):
    """Moments of ``x`` over some dims (kept as size-1 dims).

    ``mean`` and ``var`` are in the accumulation dtype. ``shift`` is the pivot
    that was subtracted (same shape as ``mean``); ``mean - shift`` is the mean of
    the shifted data, which is what an accurate normalization subtracts from
    ``x - shift``. ``count`` is the number of elements behind each statistic.
    """

    mean: Tensor
    var: Tensor
    shift: Tensor
    count: int


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 input, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _norm_dims(x: Tensor, dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted(d % x.dim() for d in dims))


def reduced_count(x: Tensor, dims: Sequence[int]) -> int:
    """Number of elements of ``x`` behind each statistic over ``dims``."""
    n = 1
    for d in _norm_dims(x, dims):
        n *= x.shape[d]
    return n


def pivot(x: Tensor, dims: Sequence[int]) -> Tensor:
    """One sample of ``x`` per reduced group (index 0 along ``dims``), kept dims.

    Detached: a norm is invariant to a constant shift, so the pivot carries no
    gradient. Returned in ``x``'s dtype; it is an element of ``x``, exact. An
    empty ``x`` (a process with no samples) gets a zero pivot of the kept-dims
    shape.
    """
    dims = _norm_dims(x, dims)
    if x.numel() == 0:
        shape = [1 if d in dims else s for d, s in enumerate(x.shape)]
        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    p = x.detach()
    for d in dims:
        p = p.narrow(d, 0, 1)
    return p


def centered(x: Tensor, shift: Tensor) -> Tensor:
    """``x - shift`` computed in the accumulation dtype (fp32 for half input).

    For fp32/fp64 this stays in ``x``'s dtype (the subtraction of a nearby value
    is exact, and keeping the dtype keeps memory at one copy).
    """
    acc = acc_dtype(x.dtype)
    if x.dtype != acc:
        return x.to(acc) - shift.to(acc)
    return x - shift.to(acc)


def moments(
    x: Tensor,
    dims: Sequence[int],
    *,
    correction: int = 0,
    shift: Tensor | None = None,
) -> Moments:
    """Mean and variance of ``x`` over ``dims`` (kept as size-1 dims).

    Args:
        x: any floating tensor.
        dims: the reduction dims.
        correction: 0 for the biased variance (normalization), 1 for the
            unbiased one (torch's ``running_var``).
        shift: a per-group pivot broadcastable to ``x`` (default: :func:`pivot`).

    Returns:
        :class:`Moments` in the accumulation dtype, variance clamped at 0.
        With ``correction=1`` and a single element the variance is NaN, as in
        torch; callers that need it check ``count`` first.
    """
    dims = _norm_dims(x, dims)
    if shift is None:
        shift = pivot(x, dims)
    shift = shift.to(acc_dtype(x.dtype))
    return centered_moments(centered(x, shift), dims, shift, correction=correction)


def centered_moments(
    xc: Tensor, dims: Sequence[int], shift: Tensor, *, correction: int = 0
) -> Moments:
    """:func:`moments` of ``xc + shift`` given the already shifted ``xc``.

    Lets an op that normalizes ``xc`` reuse it for its statistics instead of
    shifting ``x`` twice. Two passes: the mean, then the mean square of the
    deviations (as stable as Welford's update, and several times faster than
    :func:`torch.var_mean` on CPU). Fewer than ``correction + 1`` elements give a
    NaN variance, as in torch; no elements at all give zero moments that stay in
    the graph (see the module doc).
    """
    dims = _norm_dims(xc, dims)
    count = reduced_count(xc, dims)
    if count == 0:
        zero = xc.sum(dim=dims, keepdim=True)
        return Moments(zero + shift, zero, shift, 0)
    mean_c = xc.mean(dim=dims, keepdim=True)
    dev = xc - mean_c
    dof = count - correction
    var = (dev * dev).sum(dim=dims, keepdim=True) / (dof if dof > 0 else float("nan"))
    return Moments(mean_c + shift, var.clamp_min(0), shift, count)


# μ²/v above which the shifted one-pass variance Σu²/L − μ² would cancel more than
# ~6 of fp32's 24 bits; such groups (a pivot far out in its group's tail) are
# recomputed with two passes. Gaussian data never get there.
_ONE_PASS_LIMIT = 64.0


def one_pass_moments(u: Tensor, per_sample: bool) -> tuple[Tensor, Tensor, int]:
    """Mean and biased variance of pivot-shifted data ``u`` per (n, c) or per channel.

    The one-pass path of the fused CPU Functions: :func:`dot_sums` gives ``Σu`` and
    ``Σu²`` in one read, then ``v = Σu²/L − μ²``. Because ``u = x − pivot`` is
    centred on an element of its own group, ``μ`` is a few standard deviations at
    most and the subtraction keeps fp32 accuracy; where ``μ² > 64·v`` (a pivot far
    out in its group's tail) the variance is recomputed in two passes, as
    :func:`centered_moments` does. Variance clamped at 0.

    Args:
        u: (N, C, *S) data minus a per-group pivot (:func:`pivot`, :func:`centered`).
        per_sample: statistics per (n, c) over the spatial dims, or per channel
            over N and the spatial dims.

    Returns:
        ``(mean, var, count)``: mean (relative to the pivot) and variance of shape
        (N or 1, C, 1, ...) in ``u``'s accumulation dtype, and the count ``L`` of
        values per statistic.
    """
    dims = tuple(range(2, u.dim())) if per_sample else (0, *range(2, u.dim()))
    count = reduced_count(u, dims)
    s0, s1 = dot_sums(u, u, per_sample)
    mean = s0 / count
    var = s1 / count - mean * mean
    if bool((mean * mean > _ONE_PASS_LIMIT * var).any()):
        var = centered_moments(u, dims, mean.new_zeros(())).var
    return mean, var.clamp_min(0), count


def rstd(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(max(var, 0) + eps)``."""
    return rsqrt(var.clamp_min(0) + eps)


def mix_group_moments(mean: Tensor, var: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Exact moments of a union of equal-sized groups from the groups' moments.

    Given per-group biased ``mean`` and ``var`` (kept dims), the union over
    ``dims`` has mean ``m = mean_k(μ_k)`` and biased variance
    ``mean_k(σ²_k + (μ_k − m)²)`` — the law of total variance, written around
    ``m`` so it stays stable (no raw second moments). Used by Switchable Norm
    and by instance-to-batch running statistics.
    """
    m, v, _ = union_moments(mean, var, dims)
    return m, v


def union_moments(
    mean: Tensor, var: Tensor, dims: int | Sequence[int]
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mix_group_moments` plus each group's deviation ``μ_k − m`` (``mean``'s shape).

    The deviation is what the adjoint of the union needs (Switchable Norm's
    fused backward), so it is returned instead of being recomputed.
    """
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    m = mean.mean(dim=dims, keepdim=True)
    dev = mean - m
    v = torch.addcmul(var, dev, dev).mean(dim=dims, keepdim=True)
    return m, v.clamp_min(0), dev


def window_mean(x: Tensor, dim: int, size: int) -> Tensor:
    """Mean over a sliding window of ``size`` along ``dim``, zero-padded.

    The window of position ``i`` is ``[i - size//2, i + (size-1)//2]``; the
    divisor is always ``size`` (torch's LocalResponseNorm convention).
    Accumulates in the accumulation dtype.
    """
    dim = dim % x.dim()
    acc = x.to(acc_dtype(x.dtype))
    if dim == 1 and x.dim() > 2 and recording():
        return _pooled_channel_window_mean(acc, size)
    pad = [0, 0] * (x.dim() - 1 - dim) + [size // 2, (size - 1) // 2]
    padded = torch.nn.functional.pad(acc, pad)
    return padded.unfold(dim, size, 1).mean(dim=-1)


def _pooled_channel_window_mean(x: Tensor, size: int) -> Tensor:
    """:func:`window_mean` over dim 1 as zero padding + ``avg_pool2d`` on (N, 1, C, S).

    For graphs that may become ONNX files (:func:`._export.recording`): the
    TorchScript exporter cannot write ``unfold`` of a padded tensor (its size is not
    known to it); ``Pad`` + ``AveragePool`` it can. The
    padding is explicit, so every window divides by ``size``.
    """
    v = x.flatten(2).unsqueeze(1)
    v = torch.nn.functional.pad(v, [0, 0, size // 2, (size - 1) // 2])
    return torch.nn.functional.avg_pool2d(v, (size, 1), stride=1).squeeze(1).reshape(x.shape)


def mean_square(x: Tensor, dims: Sequence[int]) -> Tensor:
    """Mean of ``x²`` over ``dims`` (kept as size-1 dims), in the accumulation dtype.

    For statistics that are *defined* as a second moment about zero, such as
    Filter Response Norm's ``ν²``: there is no mean subtracted, so no
    cancellation to guard against; only the accumulation dtype matters (fp32
    for half input).
    """
    xa = x.to(acc_dtype(x.dtype))
    return (xa * xa).mean(dim=_norm_dims(x, dims), keepdim=True)


# ----------------------------------------------------------- reductions of the fused Functions

NATIVE_PLANE = 2**16
"""Most values per statistic that :func:`dot_sums` reduces with torch's batch-norm
backward kernel. That kernel accumulates each plane in a few lanes of the input's
dtype, whose rounding error grows with the plane; beyond this size ``torch.sum``'s
cascade keeps fp32 sums to about 1e-7 relative, so the larger planes use it."""


def dot_sums(
    a: Tensor, b: Tensor, per_sample: bool, shift: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(Σ a, Σ a·(b − shift))`` per (n, c) (``per_sample``) or per channel, kept dims.

    Args:
        a, b: (N, C, *S) tensors; ``a`` is typically an upstream gradient.
        per_sample: sums over the spatial dims (one statistic per (n, c)) or over N
            and the spatial dims (one per channel).
        shift: one value per statistic, (N, C, 1, ...) or (1, C, 1, ...), in
            ``b``'s dtype; None is a zero shift. A pivot (an element of ``b``)
            makes ``b − shift`` exact, as :func:`centered`.

    Returns:
        Two tensors of shape (N or 1, C, 1, ...) in the accumulation dtype of ``b``.

    For fp32/fp64 contiguous tensors of at most :data:`NATIVE_PLANE` values per
    statistic this is torch's batch-norm backward reduction: with ``mean = shift``
    and ``invstd = 1`` its ``grad_bias`` is ``Σ a`` and its ``grad_weight`` is
    ``Σ a·(b − shift)``, both from one read of ``a`` and ``b`` and without a
    full-size ``a·b`` temporary (on CPU a fresh full-size buffer can cost more in
    page faults than the pass itself); per (n, c) by viewing (N, C, *S) as one
    sample with N·C channels. Otherwise (half inputs, other layouts, larger
    planes): ``a·(b − shift)`` and ``torch.sum`` in the accumulation dtype.
    """
    n, c = a.shape[:2]
    dims = tuple(range(2, a.dim())) if per_sample else (0, *range(2, a.dim()))
    count = 1
    for d in dims:
        count *= a.shape[d]
    acc = acc_dtype(b.dtype)
    native = (
        a.dtype == b.dtype == acc
        and (shift is None or shift.dtype == acc)
        and count <= NATIVE_PLANE
        and a.is_contiguous()
        and b.is_contiguous()
    )
    if not native:
        bc = b if shift is None else centered(b, shift)
        return (
            a.sum(dim=dims, keepdim=True, dtype=acc),
            (a * bc).sum(dim=dims, keepdim=True, dtype=acc),
        )
    rows = n if per_sample else 1
    if per_sample:
        a, b = a.view(1, n * c, -1), b.view(1, n * c, -1)
    mean = a.new_zeros(rows * c) if shift is None else shift.reshape(-1)
    _, s_ab, s_a = torch.ops.aten.native_batch_norm_backward(
        a, b, None, None, None, mean, torch.ones_like(mean), True, 0.0, [False, True, True]
    )
    shape = [rows, c] + [1] * (len(dims) if per_sample else len(dims) - 1)
    return s_a.view(shape), s_ab.view(shape)


def sum_of_squares(x: Tensor, dims: Sequence[int], out: Tensor | None = None) -> Tensor:
    """``Σ x²`` over ``dims`` (kept), one read of ``x``, in ``x``'s dtype.

    ``vector_norm`` reduces contiguous memory in one vectorized pass without a
    temporary; on other layouts (channels_last) its reduction is slow, and
    ``x·x`` (written into ``out`` when given, which may be ``x`` itself) then a
    sum is faster.
    """
    if x.is_contiguous():
        return torch.linalg.vector_norm(x, 2, dim=tuple(dims), keepdim=True).square_()
    sq = x * x if out is None else torch.mul(x, x, out=out)
    return sq.sum(dim=tuple(dims), keepdim=True)


class PooledMoments:
    """Per-channel count ``n``, ``mean`` and ``m2 = Σ (x − mean)²`` of every value added.

    Batches merge with Chan et al.'s parallel update (the law of total variance), in
    float64, so the result is that of all values at once whatever the batch sizes.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, flat: Tensor) -> Tensor:
        """Merge ``flat`` (C, n_b), float64, same C as before (the caller checks); returns
        this batch's ``Σ (x − mean_b)²`` per channel."""
        nb = flat.shape[1]
        mb = flat.mean(dim=1)
        m2b = (flat - mb[:, None]).square().sum(dim=1)
        self.merge(nb, mb, m2b)
        return m2b

    def merge(self, nb: int, mb: Tensor, m2b: Tensor) -> None:
        """Merge the moments of ``nb`` other values (their per-channel mean ``mb`` and
        ``m2b = Σ (x − mb)²``, float64): another batch, or another process's pool."""
        if nb == 0:
            return
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta.square() * (self.n * nb / n)
        self.n = n
