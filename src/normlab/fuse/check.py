"""Numerics of conv + BN folding: the folded weights, their checks, and output comparison.

Three checks guard :func:`normlab.fuse.fuse_conv_bn`, from cheapest to strongest:

- *probe* checks per pair on small random float64 inputs: the BN against the
  affine map being folded (catches BatchNorm variants that do not compute
  ``(x - mean) / sqrt(var + eps) * weight + bias``) and, for conv subclasses,
  the fused copy against the conv followed by that map (catches convs that
  transform their weight in forward: weight standardization undoes the folded
  per-channel scale);
- a *site* check on the user's ``check_inputs``: forward hooks run the fused
  conv on the input each original conv really receives and compare it with what
  the original BN really returns. It is local, so it does not depend on
  anything downstream (detections whose order changes with rounding);
- an *output* check: the model's outputs before and after, where comparable
  (:func:`compare_outputs`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["compare_outputs", "default_tol"]

Compare = Callable[[Any, Any], Any]


TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def out_channels(lin: nn.Module) -> int:
    """Output channels of a conv, transposed conv or linear layer."""
    return int(lin.out_features if isinstance(lin, nn.Linear) else lin.out_channels)


def bn_affine(bn: nn.Module, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(scale, shift) per channel such that eval ``bn(x) == x * scale + shift``."""
    mean = bn.running_mean.detach().to(dtype)
    var = bn.running_var.detach().to(dtype)
    gamma = bn.weight.detach().to(dtype) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(dtype) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + float(getattr(bn, "eps", 1e-5)))
    return scale, beta - mean * scale


def fold_affine(
    lin: nn.Module, scale: Tensor, shift: Tensor, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of ``lin(x) * scale + shift`` (per output channel) in ``dtype``."""
    w = lin.weight.detach().to(dtype)
    n = out_channels(lin)
    b = lin.bias.detach().to(dtype) if lin.bias is not None else w.new_zeros(n)
    ones = [1] * (w.dim() - 2)
    if isinstance(lin, TRANSPOSED):  # weight (in, out / groups, *k)
        g = lin.groups
        w = (w.reshape(g, -1, *w.shape[1:]) * scale.reshape(g, 1, -1, *ones)).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return w, b * scale + shift


def fold(
    lin: nn.Module, bn: nn.Module, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Folded (weight, bias) of ``bn(lin(x))`` in ``dtype``."""
    return fold_affine(lin, *bn_affine(bn, dtype), dtype)


def fused_module(lin: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    """A copy of ``lin`` holding the folded weight and bias (a bias is added if it had none)."""
    fused = copy.deepcopy(lin)
    ref = lin.weight
    with torch.no_grad():
        fused.weight.copy_(weight.to(ref.dtype))
        if fused.bias is None:
            zeros = ref.new_zeros(out_channels(lin))
            fused.bias = nn.Parameter(zeros, requires_grad=ref.requires_grad)
        fused.bias.copy_(bias.to(ref.dtype))
    return fused


def _randn(*shape: int) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g, dtype=torch.float64) + 0.3


def probe(lin: nn.Module) -> Tensor:
    """A small random float64 input that ``lin`` accepts."""
    if isinstance(lin, nn.Linear):
        return _randn(2, lin.in_features)
    sizes = []
    for i in range(len(lin.kernel_size)):
        extent = lin.dilation[i] * (lin.kernel_size[i] - 1) + 1
        pad = lin.padding[i] if isinstance(lin.padding, tuple) else extent
        sizes.append(extent + pad + lin.stride[i])
    return _randn(2, lin.in_channels, *sizes)


def bn_error(bn: nn.Module, tail: nn.Module | None, spatial: int) -> float | None:
    """Max error of ``tail(x * scale + shift)`` against ``bn(x)`` in float64, None if it matches.

    Catches BN variants whose eval forward is not the folded affine map (the
    tail is what a norm+activation layer applies after it).
    """
    bn64 = copy.deepcopy(bn).double().eval()
    x = _randn(2, bn.running_mean.shape[0], *([3] * spatial)).to(bn.running_mean.device)
    scale, shift = bn_affine(bn64)
    view = (1, -1, *([1] * spatial))
    with torch.no_grad():
        want = bn64(x)
        got = x * scale.reshape(view) + shift.reshape(view)
        if tail is not None:
            got = copy.deepcopy(tail).double().eval()(got)
    return mismatch(got, want, 1e-9, 1e-9)


def conv_error(lin: nn.Module) -> float | None:
    """Max error of folding a random per-channel affine map into ``lin`` (float64), or None.

    Only conv subclasses need it: one that transforms its weight in forward
    (weight standardization) undoes the folded scale.
    """
    lin64 = copy.deepcopy(lin).double()
    x = probe(lin).to(lin.weight.device)
    n = out_channels(lin)
    scale, shift = (_randn(n).abs() + 0.5).to(x.device), _randn(n).to(x.device)
    view = (1, -1, *([1] * (x.dim() - 2)))
    with torch.no_grad():
        want = lin64(x) * scale.reshape(view) + shift.reshape(view)
        got = fused_module(lin64, *fold_affine(lin64, scale, shift))(x)
    return mismatch(got, want, 1e-9, 1e-9)


def default_tol(dtype: torch.dtype) -> float:
    """Default rtol = atol of the fusion checks: 1e-8 float64, 1e-4 float32, 1e-2 otherwise."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)


def mismatch(got: Tensor, want: Tensor, rtol: float, atol: float) -> float | None:
    """Largest violation of ``|got - want| <= atol·max(1, max|want|) + rtol·|want|``, or None."""
    if got.shape != want.shape:
        return float("inf")
    g, w = got.detach().double(), want.detach().double()
    scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
    err = (g - w).abs() - (atol * scale + rtol * w.abs())
    worst = float(err.max()) if err.numel() else 0.0
    return None if worst <= 0 else float((g - w).abs().max())


def _is_detection(d: Mapping) -> bool:
    return isinstance(d.get("boxes"), Tensor)


class _Walk:
    """State of one :func:`compare_outputs` walk: tolerances, counters, first problem."""

    def __init__(self, rtol: float | None, atol: float | None) -> None:
        self.rtol, self.atol = rtol, atol
        self.compared = 0
        self.skipped: list[str] = []

    def __call__(self, a: Any, b: Any, where: str) -> str | None:
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
                return f"{where}: a tensor on one side only"
            if a.shape != b.shape:
                return f"{where}: shape {tuple(a.shape)} before, {tuple(b.shape)} after"
            self.compared += 1
            if not a.is_floating_point() and not a.is_complex():
                return None if torch.equal(a, b) else f"{where}: values differ"
            tol = default_tol(a.dtype)
            rtol = tol if self.rtol is None else self.rtol
            atol = tol if self.atol is None else self.atol
            bad = mismatch(b, a, rtol, atol)
            return None if bad is None else f"{where} differs by up to {bad:.3g}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            if _is_detection(a) and _is_detection(b):
                self.skipped.append(where)
                return None
            if list(a) != list(b):
                return f"{where}: keys {list(a)} before, {list(b)} after"
            for k in a:
                problem = self(a[k], b[k], f"{where}[{k!r}]")
                if problem:
                    return problem
            return None
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            if len(a) != len(b):
                return f"{where}: {len(a)} items before, {len(b)} after"
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                problem = self(x, y, f"{where}[{i}]")
                if problem:
                    return problem
            return None
        if isinstance(a, (int, float, str, bool, type(None))):
            return None if a == b else f"{where}: {a!r} before, {b!r} after"
        return None  # an object without a known structure: not comparable


def compare_outputs(
    before: Any, after: Any, *, rtol: float | None = None, atol: float | None = None
) -> str | None:
    """The first difference between two model outputs, or None when they agree.

    Walks tensors, tuples, lists and dicts in parallel: structure (types, keys,
    lengths, shapes) must be the same; floating tensors must agree within
    ``rtol``/``atol`` (default by dtype, :func:`default_tol`; ``atol`` scales with
    the tensor's magnitude), other tensors exactly. Detection dicts (a dict with
    a ``"boxes"`` tensor, as torchvision's detectors return) are not compared:
    score thresholds, top-k and NMS keep or reorder boxes on rounding-level
    differences, so they can legitimately differ; the site check covers the
    fused layers of such models. Objects of unknown types are skipped.
    """
    return _Walk(rtol, atol)(before, after, "output")


def run_compare(compare: Compare, before: Any, after: Any) -> str | None:
    """Run a user ``compare(before, after)``: None/True/"" mean agreement, else a problem."""
    try:
        result = compare(before, after)
    except Exception as e:  # the user's way of saying "mismatch"
        return f"compare raised {type(e).__name__}: {e}"
    if result is None or result is True:
        return None
    if result is False:
        return "compare returned False"
    if isinstance(result, Tensor) and result.numel() == 1 and result.dtype == torch.bool:
        return None if bool(result) else "compare returned False"
    return str(result) or None


class SiteCheck:
    """Forward hooks that check each fused site on the real inputs of one run.

    For every planned (conv, BN) pair, the conv's hook runs the fused copy (and
    the activation tail) on the input the conv really got; the BN's hook finds
    which conv produced its input (by tensor identity) and compares. A BN call
    whose input no planned conv produced, or a conv whose output never reaches
    its BN, means the traced wiring does not hold at run time.
    """

    def __init__(self, pairs: list[Any], rtol: float | None, atol: float | None) -> None:
        self.pairs = pairs
        self.rtol, self.atol = rtol, atol
        self.pending: dict[int, tuple[Tensor, Tensor, Any]] = {}
        self.errors: dict[int, float] = {}  # index of pair -> worst error
        self.wiring: dict[int, str] = {}  # index of BN group -> problem
        self.seen: set[int] = set()
        self.handles: list[Any] = []

    def __enter__(self) -> SiteCheck:
        for i, p in enumerate(self.pairs):
            self.handles.append(p.conv.register_forward_hook(self._conv_hook(i)))
        for bn in {id(p.bn): p.bn for p in self.pairs}.values():
            self.handles.append(bn.register_forward_hook(self._bn_hook(bn)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.pending.clear()

    def _conv_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            p = self.pairs[i]
            if id(out) in self.pending or not isinstance(out, Tensor):
                return
            with torch.no_grad():
                got = p.fused(*args)
                if p.tail is not None:
                    got = p.tail(got)
            self.pending[id(out)] = (out, got, i)

        return hook

    def _bn_hook(self, bn: nn.Module) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0] if args else None
            entry = self.pending.pop(id(x), None)
            if entry is None or entry[0] is not x or self.pairs[entry[2]].bn is not bn:
                self.wiring[id(bn)] = "it ran on a tensor that its planned conv did not produce"
                return
            _, got, i = entry
            self.seen.add(i)
            tol = default_tol(out.dtype)
            rtol = tol if self.rtol is None else self.rtol
            bad = mismatch(got, out, rtol, tol if self.atol is None else self.atol)
            if bad is not None:
                self.errors[i] = max(bad, self.errors.get(i, 0.0))

        return hook

    def dangling(self) -> dict[int, str]:
        """BN groups whose conv ran but whose output never reached the BN."""
        out = dict(self.wiring)
        for _, _, i in self.pending.values():
            out.setdefault(id(self.pairs[i].bn), "its conv's output did not reach it at run time")
        return out
