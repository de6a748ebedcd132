"""Python helpers shared by the kernel files: (N, C, S) views by strides, tiles and the
launch plan, allocation (poisonable for tests), the partial-row reduction's launcher. A
kernel addresses ``n·stride_n + c·stride_c + s·stride_s`` (S: the flattened spatial
dims), so NCHW and channels_last need no copy; only unflattenable spatial strides are
copied. The ``@triton.jit`` helpers are in :mod:`._jit`."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements of one program's tile: 16 fp32 values per thread at 4 warps. Chosen from the
# layout alone (untimed): the first thing to tune on a GPU.
TILE = 2048
# Interpreter: a tile op costs the same whatever its size, so one big tile per program;
# tests lower this to run the multi-tile loops, their tail masks and the split paths.
INTERPRET_TILE = 4096

_POISON = False


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fill every buffer the kernels allocate with NaN (tests: an unwritten value fails)."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(t: Tensor) -> Tensor:
    """Same shape, dtype and strides as ``t`` (a dense ``t``: any memory format)."""
    out = torch.empty_like(t)
    if _POISON:
        out.fill_(float("nan"))
    return out


def tl_acc(dtype: torch.dtype) -> tl.dtype:
    """The accumulation dtype for ``dtype``, as ``_core.stats.acc_dtype`` (numerics rule 1)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _flat_spatial_stride(t: Tensor) -> int | None:
    """The stride of the flattened spatial dims of ``t`` (N, C, *S), or None when the
    spatial dims cannot be flattened without a copy."""
    dims = [d for d in range(2, t.dim()) if t.shape[d] != 1]
    if not dims or 0 in t.shape[2:]:  # nothing to address: any stride will do
        return 1
    for a, b in zip(dims, dims[1:], strict=False):
        if t.stride(a) != t.stride(b) * t.shape[b]:
            return None
    return t.stride(dims[-1])


def ncs(t: Tensor) -> tuple[Tensor, int, int, int]:
    """``(t', stride_n, stride_c, stride_s)`` for ``t`` seen as (N, C, S).

    ``t'`` is ``t`` itself unless its spatial dims cannot be flattened by strides;
    then it is a contiguous copy.
    """
    ss = _flat_spatial_stride(t)
    if ss is None:
        t = t.contiguous()
        ss = _flat_spatial_stride(t)
        assert ss is not None
    return t, t.stride(0), t.stride(1), ss


def spatial_size(t: Tensor) -> int:
    s = 1
    for d in t.shape[2:]:
        s *= d
    return s


def channels_fastest(sc: int, ss: int, s_len: int) -> bool:
    """Whether channels are the contiguous axis (channels_last): tiles run along C."""
    return sc == 1 and (ss != 1 or s_len == 1)


def tile_size(device: torch.device) -> int:
    return TILE if device.type == "cuda" else INTERPRET_TILE


def tile(c_len: int, s_len: int, c_fast: bool, size: int) -> tuple[int, int]:
    """``(BLOCK_C, BLOCK_S)``: powers of two, product <= ``size``, contiguous axis first."""
    p2c, p2s = triton.next_power_of_2(max(c_len, 1)), triton.next_power_of_2(max(s_len, 1))
    if c_fast:
        bc = min(p2c, size)
        return bc, min(p2s, max(1, size // bc))
    bs = min(p2s, size)
    return min(p2c, max(1, size // bs)), bs


def num_warps(block: int) -> int:
    """Warps for a tile of ``block`` elements: 16 fp32 values per thread, 1 to 8 warps."""
    return max(1, min(8, block // 512))


#: Programs per SM the plan aims at (several resident programs hide memory latency).
PROGRAMS_PER_SM = 4
#: The smallest tile the plan shrinks to on a GPU to reach that many programs.
MIN_TILE = 512


def smallest_tile(device: torch.device) -> int:
    """The tile a :class:`Plan` never shrinks below (no shrinking under the interpreter)."""
    return MIN_TILE if device.type == "cuda" else tile_size(device)


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy: PROGRAMS_PER_SM per SM on CUDA (528 on
    an H100's 132 SMs). Under the interpreter a pretend count of 4, so that tiny test
    shapes exercise the split code paths."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _chunks(length: int, block: int, parts: int) -> tuple[int, int]:
    """``(splits, chunk)``: ``length`` cut into at most ``parts`` chunks, each a multiple
    of ``block`` (the last one shorter), none empty."""
    tiles = triton.cdiv(length, block)
    chunk = triton.cdiv(tiles, max(1, min(parts, tiles))) * block
    return triton.cdiv(length, chunk), chunk


class Plan:
    """Launch geometry of one call over ``x`` seen as (N, C, S), shared by its forward
    and its backward: the one planning function of the kernels.

    Axis 0 of the grid runs ``per_sample`` programs per sample (``rows`` in all):
    with ``groups``, one per ``pack`` consecutive groups of ``cpg`` = C/groups channels
    (``width`` = pack·cpg); without, one per block of BLOCK_C channels (``width`` = C).
    Tiles are (BLOCK_C, BLOCK_S), the contiguous axis filled first. When ``rows``
    programs alone would leave the device idle and the kernels merge partial results
    (``may_split``), axis 1 splits each row's extent into ``split = split_c · split_s``
    pieces: ``split_s`` chunks of ``chunk_s`` positions and (one group per program only:
    the group's flattened channels × positions extent) ``split_c`` chunks of
    ``chunk_c`` channels; the tile shrinks (down to MIN_TILE on a GPU) until there are
    enough pieces. Without a split, ``split`` is 1,
    ``chunk_s`` is S and ``chunk_c`` the width.
    """

    def __init__(
        self,
        x: Tensor,
        x_sc: int,
        x_ss: int,
        *,
        groups: int | None = None,
        may_split: bool = False,
        pack: int = 1,
    ) -> None:
        self.n, self.c, self.s = x.shape[0], x.shape[1], spatial_size(x)
        self.cpg = self.c if groups is None else self.c // groups
        self.pack = pack
        self.width = self.cpg * pack
        c_fast = channels_fastest(x_sc, x_ss, self.s)
        size = tile_size(x.device)
        floor = smallest_tile(x.device)
        target = target_programs(x.device)
        while True:
            self.block_c, self.block_s = tile(self.width, self.s, c_fast, size)
            self.per_sample = (
                triton.cdiv(self.c, self.block_c) if groups is None else triton.cdiv(groups, pack)
            )
            self.rows = self.n * self.per_sample
            self.split_c, self.chunk_c = 1, self.width
            self.split_s, self.chunk_s = 1, self.s
            if not (may_split and self.s > 0 and self.rows < target):
                break
            want = triton.cdiv(target, max(self.rows, 1))
            self.split_s, self.chunk_s = _chunks(self.s, self.block_s, want)
            if groups is not None and pack == 1:
                rest = triton.cdiv(want, self.split_s)
                self.split_c, self.chunk_c = _chunks(self.width, self.block_c, rest)
            if self.split_c * self.split_s >= want or size <= floor:
                break
            size //= 2
        self.split = self.split_c * self.split_s
        self.chunk = self.chunk_s
        self.grid = (self.rows, self.split)
        self.block_p = triton.next_power_of_2(self.split)
        self.warps = num_warps(self.block_c * self.block_s)


def channel_plan(x: Tensor, x_sc: int, x_ss: int) -> Plan:
    """The plan of the per-channel kernels (frozen BN, FRN, Switchable Norm): one program
    per (n, block of channels), each row's positions split over several programs when
    those alone would leave the device idle."""
    return Plan(x, x_sc, x_ss, may_split=True)


def device_guard(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(t.device)`` for a CUDA tensor (Triton launches on the current
    device, not the tensor's), a no-op otherwise."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


F = TypeVar("F", bound=Callable[..., Any])


def kernel_forward(fn: F) -> F:
    """Decorates an autograd.Function's ``forward(ctx, x, ...)``: runs it on x's device."""

    @functools.wraps(fn)
    def forward(ctx: Any, x: Tensor, *args: Any) -> Any:
        with device_guard(x):
            return fn(ctx, x, *args)

    return forward  # type: ignore[return-value]


def kernel_backward(label: str) -> Callable[[F], F]:
    """Decorates an autograd.Function's ``backward(ctx, dy, ...)``: runs it on dy's device
    without recording a graph, and refuses double backward (``create_graph=True``) with
    the fix instead of returning a gradient that silently lacks its graph."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def backward(ctx: Any, dy: Tensor, *args: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{label}: the Triton kernels compute a first derivative only, and this "
                    "backward was asked to build a graph (create_graph=True: double "
                    "backward, a gradient penalty, gradgradcheck). Use backend='torch' for "
                    "this layer (or NORMLAB_TRITON=0), which differentiates twice."
                )
            with device_guard(dy):
                return fn(ctx, dy, *args)

        return backward  # type: ignore[return-value]

    return wrap


def dense(t: Tensor | None) -> Tensor | None:
    """``t`` contiguous (the kernels read a sliced or expanded γ, β or τ as (C,)), or None."""
    return None if t is None else t.contiguous()


def sum_partials(kernel: Any, part: Tensor) -> Tensor:
    """(K, P, C) partial sums -> (K, C) sums, in ``part``'s dtype (fp32/fp64), with
    ``kernel`` (a phase kernel whose body is :func:`._jit.sum_rows`).

    The deterministic replacement for atomics: each program of a backward kernel
    writes its own row of per-channel sums, this kernel adds the rows.
    """
    k, p, c = part.shape
    out = empty((k, c), part.dtype, part.device)
    size = tile_size(part.device)
    block_c = min(triton.next_power_of_2(c), 128, size)
    block_p = min(triton.next_power_of_2(p), max(1, size // block_c))
    kernel[(triton.cdiv(c, block_c), k)](
        part,
        out,
        p,
        c,
        ACC=tl_acc(part.dtype),
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out
