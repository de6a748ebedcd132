r"""Moving Average Batch Normalization (Yan et al., ICLR 2020), pure functional form.

"Towards Stabilizing Batch Statistics in Backward Propagation of Batch
Normalization" observes that BN's backward pass depends on two more batch
statistics than its forward pass, ``E[g]`` and ``E[g·x̂]``, and that their noise
at small batch sizes hurts as much as the noise of the forward statistics.
MABN removes the mean statistics altogether (the mean is taken out of the
*weights* of the preceding convolution, :class:`normlab.nn.CenteredConv2d`) and
replaces the two that remain with moving averages over the last ``m`` steps.

Our reading of the paper's Algorithm 1 and of the authors' release, per channel,
at training step ``t`` (``t`` = steps taken before this one):

Forward::

    χ_B   = E[x²]                     over (N, *S) of this batch, no mean subtracted
    χ_SMA = mean of χ_B over the last m steps (this one included; fewer while
            the window fills: only written slots count)
    χ     = χ_B during warm-up (t < warmup_iters), else χ_SMA
    x̂     = x / sqrt(χ + ε)
    r     = 1 while t < r_warmup_iters (default: warmup_iters),
            else clip(sqrt(χ + ε) / sqrt(χ_EMA + ε), 1/r_clip, r_clip)
    y     = γ·r·x̂ + β
    χ_EMA ← (1 − momentum)·χ_EMA + momentum·χ          (``running_var``, after r)

``r`` is batch renormalization's ratio: unclipped, ``r·x̂ = x / sqrt(χ_EMA + ε)``,
so training normalizes like inference does, and the clip bounds the step
between the two. ``r`` and ``χ`` carry no gradient.

Backward (not the exact gradient of the forward: that is the point)::

    g   = γ·r·∂L/∂y                                    (∂L/∂x̂)
    ψ_B = E[g·x̂]                                       over (N, *S), this batch
    ψ   = ψ_B during warm-up, else ψ_SMA (this batch's ψ_B included)
    ∂L/∂x = (g − x̂·ψ) / sqrt(χ + ε)
    ∂L/∂γ = Σ ∂L/∂y·r·x̂,   ∂L/∂β = Σ ∂L/∂y

Warm-up: batch statistics and r = 1 for the first steps (weights move fast,
so old statistics are stale). During warm-up MABN is exactly "mean-free BN":
``x / sqrt(E[x²] + ε)`` with its true batch gradient; the windows keep filling,
so the moving averages are ready when it ends. The authors' ``MABN2d(C, B,
real_B, momentum=α, warmup_iters=W)`` counts steps from 1 and switches to the
moving averages at its step W (t = W − 1 here) once its window is full (t ≥ m),
and r at t = max(1000, W); with W − 1 ≥ m it is ``window=real_B // B,
warmup_iters=W − 1, r_warmup_iters=max(1000, W), momentum=1 − α`` here. The
defaults (``warmup_iters=100``, r from the same step, ``momentum=0.1``) are
normlab's, not that schedule.

Unlike the release: any batch size ≥ 1 (χ is a second moment, so a single value
per channel is a valid statistic; no even-batch or buffer-size coupling), no
host synchronisation (no ``.item()``: step-dependent choices are
``torch.where`` on tensors), and every piece of state is a tensor passed in and
updated in place, so a checkpointed module resumes bit-identically.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._core.checks import (
    check_count,
    check_norm_input,
    check_params,
    stored_variance,
)
from .._core.collectives import all_reduce_sum, resolve_process_group, sync_moments
from .._core.dispatch import Op, choose_path
from .._core.normalize import channel_shape
from .._core.running import all_finite, guarded_copy_, note, snapshot
from .._core.stats import acc_dtype, dot_sums, reduced_count, rstd

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["moving_average_batch_norm", "check_mabn_options"]

_LAYER = "moving_average_batch_norm"


def check_mabn_options(
    layer: str,
    window: int,
    warmup_iters: int,
    r_clip: float,
    momentum: float | None,
    r_warmup_iters: int | None = None,
) -> None:
    """Validate MABN's hyper-parameters with messages that say how to fix them."""
    if r_warmup_iters is not None and int(r_warmup_iters) < 0:
        raise ValueError(f"{layer}: r_warmup_iters must be >= 0 or None, got {r_warmup_iters}.")
    if check_count(layer, "window", window, minimum=0) < 1:
        raise ValueError(
            f"{layer}: window must be >= 1 (the number of recent steps in the moving "
            f"averages), got {window}. window=1 uses the current batch only; the paper "
            "uses 16."
        )
    if int(warmup_iters) < 0:
        raise ValueError(
            f"{layer}: warmup_iters must be >= 0 (steps of plain mean-free BN before "
            f"the moving averages and renormalization start), got {warmup_iters}."
        )
    if not r_clip >= 1.0:
        raise ValueError(
            f"{layer}: r_clip must be >= 1 (r is clipped to [1/r_clip, r_clip]), got "
            f"{r_clip}. r_clip=1 turns renormalization off; the paper uses 5."
        )
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"{layer}: momentum must be in [0, 1] (the weight of the new statistic in "
            f"running_var) or None (cumulative average), got {momentum}."
        )


def _channel_sums(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(Σ a, Σ a·b)`` per channel, shape (C,); an empty input (a rank with no
    samples under a process group) gives zeros."""
    if a.numel() == 0:
        z = a.new_zeros(a.shape[1])
        return z, z.clone()
    s_a, s_ab = dot_sums(a, b, per_sample=False)
    return s_a.reshape(-1), s_ab.reshape(-1)


class _MABNFunction(torch.autograd.Function):
    """``y = γ·r·x·s + β`` with MABN's moving-average backward.

    Saves only ``x`` and per-channel vectors; ``x̂ = x·s`` is recomputed in
    backward. The ψ window is a buffer handed over on ``ctx`` (not saved for
    backward), written in backward at the slot of the forward's step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (N, C, *S)
        weight: Tensor | None,  # (C,)
        bias: Tensor | None,  # (C,)
        s: Tensor,  # (C,) 1/sqrt(χ + ε), accumulation dtype
        r: Tensor,  # (C,) renormalization ratio, accumulation dtype
        psi_window: Tensor,  # (m, C)
        psi_filled: Tensor,  # () long
        slot: Tensor,  # (1,) long: this step's slot in the window
        use_window: Tensor,  # () bool: past warm-up
        finite: Tensor,  # () bool: the forward kept its statistics (not a skipped batch)
        group: ProcessGroup | None = None,  # sync ψ over this group
        total: Tensor | None = None,  # () values per channel over the group
    ) -> Tensor:
        acc = s.dtype
        shape = channel_shape(x)
        a = s * r if weight is None else s * r * weight.to(acc)
        xa = x.to(acc)
        if bias is None:
            y = xa * a.reshape(shape)
        else:
            y = torch.addcmul(bias.to(acc).reshape(shape), xa, a.reshape(shape))
        ctx.save_for_backward(x, weight, s, r)
        ctx.has_bias = bias is not None
        ctx.psi_window, ctx.psi_filled = psi_window, psi_filled
        ctx.slot, ctx.use_window, ctx.finite = slot, use_window, finite
        ctx.group, ctx.total = group, total
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, s, r = ctx.saved_tensors
        acc = s.dtype
        shape = channel_shape(x)
        dims = (0, *range(2, x.dim()))
        n = reduced_count(x, dims)
        dya = dy.to(acc)
        xa = x.to(acc)
        gamma = torch.ones_like(s) if weight is None else weight.to(acc)
        # Σ dy·x and Σ dy per channel are the only reductions over the input, both
        # from one read of dy and x (dot_sums): ψ_B = E[g·x̂] = γ·r·s·E[dy·x],
        # ∂L/∂γ = r·s·Σ dy·x, ∂L/∂β = Σ dy.
        sum_dy, sum_dy_x = _channel_sums(dya, xa)
        if ctx.group is None:
            psi_b = gamma * r * s * sum_dy_x / n
        else:  # ψ of the global batch: the one backward all_reduce
            psi_b = gamma * r * s * all_reduce_sum(sum_dy_x, ctx.group) / ctx.total.to(acc)
        with torch.no_grad():  # ψ of a skipped or non-finite batch is not kept
            window, ok = ctx.psi_window, ctx.finite & torch.isfinite(psi_b).all()
            new = window.index_copy(0, ctx.slot, psi_b.reshape(1, -1).to(window.dtype))
            filled = (ctx.psi_filled + 1).clamp_(max=window.shape[0])
            psi_sma = new.sum(dim=0).to(acc) / filled.to(acc)
            guarded_copy_(window, new, ok)
            guarded_copy_(ctx.psi_filled, filled, ok)
        psi = torch.where(ctx.use_window, psi_sma, psi_b)
        # ∂L/∂x = s·(g − x̂·ψ) = (γ·r·s)·dy − (s²·ψ)·x
        dx = None
        if ctx.needs_input_grad[0]:
            a = (gamma * r * s).reshape(shape)
            b = (s * s * psi).reshape(shape)
            dx = dya * a  # a fresh buffer, then one in-place pass
            dx = dx.addcmul_(xa, b, value=-1).to(x.dtype)
        dweight = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = (r * s * sum_dy_x).to(weight.dtype)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = sum_dy.to(dy.dtype)
        return dx, dweight, dbias, None, None, None, None, None, None, None, None, None


def _check_state(
    c: int,
    chi_window: Tensor | None,
    psi_window: Tensor | None,
    psi_filled: Tensor | None,
    num_batches_tracked: Tensor | None,
) -> int:
    if (
        chi_window is None
        or psi_window is None
        or psi_filled is None
        or num_batches_tracked is None
    ):
        raise ValueError(
            f"{_LAYER}: training=True needs the state tensors chi_window, psi_window, "
            "psi_filled and num_batches_tracked (the moving-average windows and step "
            "counters, updated in place); normlab.nn.MovingAverageBatchNorm2d holds them "
            "for you. Pass training=False to normalize with running_var only."
        )
    if chi_window.dim() != 2 or chi_window.shape[1] != c or chi_window.shape[0] < 1:
        raise ValueError(
            f"{_LAYER}: chi_window must have shape (window, C) = (m, {c}) with m >= 1, "
            f"got {tuple(chi_window.shape)}."
        )
    if psi_window.shape != chi_window.shape:
        raise ValueError(
            f"{_LAYER}: psi_window has shape {tuple(psi_window.shape)}, expected the "
            f"shape of chi_window {tuple(chi_window.shape)}."
        )
    for name, t in (("psi_filled", psi_filled), ("num_batches_tracked", num_batches_tracked)):
        if t.dim() != 0 or t.dtype != torch.long:
            raise ValueError(
                f"{_LAYER}: {name} must be a 0-d long tensor (a step counter), got shape "
                f"{tuple(t.shape)} and dtype {t.dtype}."
            )
    return chi_window.shape[0]


def moving_average_batch_norm(
    input: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    chi_window: Tensor | None = None,
    psi_window: Tensor | None = None,
    psi_filled: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    warmup_iters: int = 100,
    r_clip: float = 5.0,
    r_warmup_iters: int | None = None,
    backend: str = "auto",
    process_group: ProcessGroup | str | None = None,
) -> Tensor:
    r"""Moving Average Batch Normalization over (N, \*spatial) per channel.

    .. math:: y = \gamma\, r\, \frac{x}{\sqrt{\chi_{SMA} + \epsilon}} + \beta,
              \qquad \chi = \mathrm{E}[x^2]

    Training: normalizes by the simple moving average of the batch second
    moment over the last ``m`` steps and back-propagates with the moving average
    of ``ψ = E[g·x̂]`` (see the module docstring of
    :mod:`normlab.functional.moving_average_batch_norm` for the full algorithm,
    the warm-up and the renormalization ratio ``r``). Eval: ``x / sqrt(running_var
    + ε)``, ``running_var`` being the EMA of ``χ``.

    Pure: it holds no state. The state tensors are passed in and updated in
    place, as :func:`torch.nn.functional.batch_norm` updates its running
    statistics: in forward ``chi_window[t % m]``, ``running_var`` and
    ``num_batches_tracked`` (``t``, incremented); in backward ``psi_window[t % m]``
    and ``psi_filled``. Nothing synchronises with the host.

    Any batch size works: ``N·prod(spatial) ≥ 1`` values per channel is enough,
    since ``χ`` is a second moment, not a variance. The mean is *not*
    subtracted: put a :class:`normlab.nn.CenteredConv2d` before this layer.

    Args:
        input: (N, C) or (N, C, \*spatial), floating point.
        running_var: (C,) EMA of ``χ``; read in eval, updated in training.
        weight, bias: (C,) or None.
        training: use (and update) the moving averages.
        momentum: weight of the new statistic in ``running_var``; None for the
            cumulative average ``1/(t + 1)``.
        eps: added to ``χ`` inside the square root, > 0.
        chi_window, psi_window: (m, C) ring buffers of the last ``m`` batch
            ``χ`` and ``ψ`` (``m`` = the window); required in training.
        psi_filled: () long, how many ``psi_window`` slots hold a value.
        num_batches_tracked: () long, training steps taken so far (``t``).
        warmup_iters: steps of plain mean-free BN (batch ``χ``, ``ψ``, ``r = 1``).
        r_clip: ``r`` is clipped to ``[1/r_clip, r_clip]`` after warm-up (>= 1).
        r_warmup_iters: steps with ``r = 1`` (>= 0); None: ``warmup_iters``.
        backend: "auto" | "torch" | "triton".
        process_group: with ``training=True``, ``χ_B`` and ``ψ_B`` are those of
            every process of this group (one all_gather in forward, one
            all_reduce in backward; None: this process only; ``"world"``: the
            default group); see :mod:`normlab.distributed`.

    Returns:
        Tensor of the input's shape and dtype.
    """
    check_norm_input(_LAYER, input, eps, 2)
    group = resolve_process_group(process_group) if training else None
    # Training has one implementation, the stateful Function (refused under torch.func).
    op = Op.MOVING_AVERAGE_BATCH_NORM if training else Op.MOVING_AVERAGE_BATCH_NORM_EVAL
    choose_path(op, input, backend, group)
    c = input.shape[1]
    check_params(_LAYER, (c,), weight=weight, bias=bias, running_var=running_var)
    dims = (0, *range(2, input.dim()))
    if group is None and reduced_count(input, dims) < 1:
        raise ValueError(
            f"{_LAYER}: input of shape {tuple(input.shape)} has no values per channel; "
            "MABN needs at least one (N >= 1 and every spatial size >= 1)."
        )
    acc = acc_dtype(input.dtype)
    shape = channel_shape(input)
    if not training:
        scale = rstd(stored_variance(_LAYER, running_var).to(acc), eps)
        if weight is not None:
            scale = scale * weight.to(acc)
        y = input.to(acc) * scale.reshape(shape)
        if bias is not None:
            y = y + bias.to(acc).reshape(shape)
        return y.to(input.dtype)

    m = _check_state(c, chi_window, psi_window, psi_filled, num_batches_tracked)
    check_mabn_options(_LAYER, m, warmup_iters, r_clip, momentum, r_warmup_iters)
    assert chi_window is not None and psi_window is not None  # narrowed by _check_state
    assert psi_filled is not None and num_batches_tracked is not None
    with torch.no_grad():
        t = num_batches_tracked
        slot = torch.remainder(t, m).reshape(1)
        if group is None:
            # E[x²] per channel in one pass without an x² temporary.
            xd = input.detach().to(acc)
            chi_b = _channel_sums(xd, xd)[1] / reduced_count(input, dims)
            chi_b = chi_b.reshape(1, c)
            total = None
        else:  # χ of the global batch: a count-weighted mean over ranks
            local_count = reduced_count(input, dims)
            xa = input.detach().to(acc)
            chi_local = (xa * xa).sum(dim=dims, keepdim=True) / max(local_count, 1)
            zero = torch.zeros_like(chi_local)
            g = sync_moments(chi_local, zero, local_count, zero, group)
            total = g.count
            if local_count < 1 and int(total) < 1:
                raise ValueError(
                    f"{_LAYER}: no process of the group has a value per channel (this "
                    f"rank's input has shape {tuple(input.shape)}); MABN needs at least one."
                )
            chi_b = g.mean_abs.reshape(1, c)
        # A non-finite χ_B is normalized with but not kept (_core.running).
        ok = all_finite(chi_b.to(chi_window.dtype))
        window = chi_window.index_copy(0, slot, chi_b.to(chi_window.dtype))
        guarded_copy_(chi_window, window, ok)
        filled = torch.clamp(t + 1, max=m).to(acc)
        chi_sma = window.sum(dim=0).to(acc) / filled
        in_warmup = t < warmup_iters
        # The stored (buffer-dtype) value of this batch, so a reload sees the same χ.
        chi_now = window.index_select(0, slot).reshape(c).to(acc)
        chi = torch.where(in_warmup, chi_now, chi_sma)
        s = rstd(chi, eps)
        # A snapshot, not a read: running_var is updated below and r is needed in
        # backward (see batch_norm.snapshot).
        (ema,) = snapshot(running_var)
        ema = ema.to(acc)
        ratio = torch.sqrt(chi + eps) / torch.sqrt(ema.clamp_min(0) + eps)
        r_off = in_warmup if r_warmup_iters is None else t < r_warmup_iters
        r = torch.where(r_off, torch.ones_like(ratio), ratio.clamp(1.0 / r_clip, r_clip))
        if momentum is None:
            factor = 1.0 / (t + 1).to(acc)
        else:
            factor = torch.full((), momentum, dtype=acc, device=input.device)
        new_ema = ema * (1 - factor) + chi * factor
        guarded_copy_(running_var, new_ema, ok)
        num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
        note(ok)
    return _MABNFunction.apply(
        input, weight, bias, s, r, psi_window, psi_filled, slot, ~in_warmup, ok, group, total
    )
