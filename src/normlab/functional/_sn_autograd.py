r"""Switchable Norm as one autograd.Function: fused passes, a hand-derived backward.

The plain autograd form of :func:`normlab.functional.switchable_norm` records
some forty full-size ops and saves several full-size tensors. Here the input
is touched by

* forward: ``u = x − pivot`` (the one full-size buffer, which becomes the
  output), one reduction pass giving ``Σu`` and ``Σu²`` per (n, c), and the
  in-place apply ``y = u·A + B``;
* backward: one reduction pass giving ``Σdy`` and ``Σdy·u`` per (n, c), then
  ``u`` again, turned in place into ``dx = u·P + Q + A·dy``;

and only ``x`` plus (N, C)-sized statistics are saved. Everything between
the reductions and the apply works on (N, C) matrices: the softmax mixing of
the IN, LN and BN moments and, in backward, its hand-derived adjoint.

Notation, per group (n, c) of ``L`` values (the spatial dims)::

    s      pivot x[n, c, 0, ...]                  (an element of x, exact)
    u      x − s
    μ, v   mean and biased variance of u          (μ relative to the pivot)
    M, V   mixed mean (relative to s) and mixed variance
    r      (max(V, 0) + ε)^(−1/2),   A = γ·r
    y      (u − M)·A + β  =  u·A + (β − M·A)

The mixing follows :func:`normlab.functional.switchable_norm`'s plain path
term for term (same pivots, same group formulas), so the two agree to rounding.

The passes and the casts are the shared ones of :mod:`normlab._core.fused` and
:mod:`normlab._core.stats`; Batch Renormalization's Function uses the same
(per channel instead of per (n, c)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._core.fused import against, apply_dx, cast, composite_grads
from .._core.mixing import mix_moments
from .._core.running import update_running_stats
from .._core.stats import centered, dot_sums, one_pass_moments, pivot, rstd

__all__ = ["SwitchableNormFunction"]


def _mix_backward(
    d_mean: Tensor,
    d_var: Tensor,
    saved: dict[str, Tensor],
    names: tuple[str, ...],
    bn_mode: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Adjoint of :func:`~normlab._core.mixing.mix_moments`: (dM, dV) → (dμ, dv, dλ, dλ').

    All (N, C) matrices, or (K,) for the logits.

    With ``w = softmax(λ)``, ``M = Σₖ wₖ mₖ`` and ``V = Σₖ w'ₖ vₖ``:

    * logits (softmax backward, written around M so nothing large cancels):
      ``dλₖ = wₖ · Σ_{n,c} dM·(mₖ − M)``, ``dλ'ₖ = w'ₖ · Σ_{n,c} dV·(vₖ − V)``;
    * IN (``m = μ``, ``v = v``): ``dμ += w_IN·dM``, ``dv += w'_IN·dV``;
    * LN, with ``G = w_LN·Σ_c dM`` and ``H = w'_LN·Σ_c dV`` per sample:
      ``dμ += G/C + 2H·(μ̃ − μ_LN)/C`` and ``dv += H/C`` (the path through
      ``μ_LN`` inside ``v_LN`` vanishes, as ``Σ_c (μ̃ − μ_LN) = 0``);
    * BN from the batch: the same over N (sums over n, divide by N);
    * BN from running statistics: constants, nothing flows to μ or v.

    ``saved["wm_g"]``/``["wv_g"]`` hold the weights divided by each
    normalizer's group size (1 for IN, C for LN, N for BN).
    """
    wm, wv = saved["wm"], saved["wv"]
    d_lm = wm * (d_mean * saved["dev_m"]).sum((1, 2))
    d_lv = wv * (d_var * saved["dev_v"]).sum((1, 2))
    k = {name: i for i, name in enumerate(names)}
    gm, gv = saved["wm_g"].unbind(), saved["wv_g"].unbind()
    h = d_var.sum(1, keepdim=True).mul_(gv[k["ln"]])  # H/C
    d_mu = torch.addcmul(d_mean.sum(1, keepdim=True).mul_(gm[k["ln"]]), h, saved["dev_ln"], value=2)
    d_v = h
    if "in" in k:
        d_mu = d_mu.add(d_mean * gm[k["in"]])
        d_v = torch.addcmul(d_v, d_var, gv[k["in"]])
    if bn_mode == "batch":
        h = d_var.sum(0, keepdim=True).mul_(gv[k["bn"]])  # H/N
        d_mu = d_mu.add(d_mean.sum(0, keepdim=True).mul_(gm[k["bn"]]))
        d_mu = d_mu.addcmul_(h, saved["dev_bn"], value=2)
        d_v = d_v + h
    return d_mu, d_v, d_lm, d_lv


class SwitchableNormFunction(torch.autograd.Function):
    """``y = (x − M)·γ/sqrt(V + ε) + β`` with IN/LN/BN moments mixed by softmax weights.

    Saves ``x`` and (N, C)-sized tensors only. A backward with
    ``create_graph=True`` differentiates the plain graph instead
    (:func:`~normlab._core.fused.composite_grads`), so higher derivatives stay exact.
    """

    # (N, C)-sized results of forward that backward reads, in save order.
    _SAVED = ("shift_x", "mu", "r", "a", "M", "V", "wm", "wv", "dev_m", "dev_v", "dev_ln",
              "dev_bn")  # fmt: skip

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,  # (N, C, *S), at least one spatial dim; (N, C) input arrives as (N, C, 1)
        mean_weight: Tensor,  # (K,) logits λ
        var_weight: Tensor,  # (K,) logits λ'
        weight: Tensor | None,  # (C,) γ
        bias: Tensor | None,  # (C,) β
        running_mean: Tensor | None,  # (C,): updated in place ("batch") or read ("running")
        running_var: Tensor | None,  # (C,)
        names: tuple[str, ...],  # the mixed normalizers, in logit order
        bn_mode: str,  # "batch" | "running" | "none"
        momentum: float,
        eps: float,
        recompute: Any,  # (x, λ, λ', γ, β, running_mean, running_var) -> y in plain ops
    ) -> Tensor:
        n, c = x.shape[:2]
        shift_x = pivot(x, range(2, x.dim()))  # (N, C, 1...): elements of x
        u = centered(x, shift_x)  # the one full-size buffer (accumulation dtype); becomes y
        acc = u.dtype
        mu, var, count = one_pass_moments(u, per_sample=True)
        mu, var = mu.reshape(n, c), var.reshape(n, c)
        shift = cast(shift_x, acc).reshape(n, c)
        mix = mix_moments(
            shift, mu, var, mean_weight, var_weight, names, bn_mode, running_mean, running_var
        )
        if bn_mode == "batch" and (running_mean is not None or running_var is not None):
            assert mix.batch_mean is not None and mix.batch_var is not None
            total = n * count
            unbiased = mix.batch_var * (total / (total - 1))
            update_running_stats(running_mean, running_var, mix.batch_mean, unbiased, momentum)
        m_mix = mix.mean
        r = rstd(mix.var, eps)  # (N, C)
        a = r if weight is None else r * cast(weight, acc)
        b = -m_mix * a if bias is None else torch.addcmul(cast(bias, acc), m_mix, a, value=-1)
        y = u.mul_(against(a, x)).add_(against(b, x))  # (u − M)·A + β: u and M small

        # The eval-mode BN branch's running statistics as they were: only a
        # double backward (the recompute) reads them.
        frozen = [None, None]
        if bn_mode == "running":
            assert running_mean is not None and running_var is not None
            frozen = [running_mean.detach().clone(), running_var.detach().clone()]
        small = dict(
            shift_x=shift_x, mu=mu, r=r, a=a, M=m_mix, V=mix.var, wm=mix.wm, wv=mix.wv,
            dev_ln=mix.dev_ln, dev_bn=mix.dev_bn,
            dev_m=mix.stack_m.sub_(m_mix), dev_v=mix.stack_v.sub_(mix.var),  # mₖ − M, vₖ − V
        )  # fmt: skip
        ctx.save_for_backward(
            x, mean_weight, var_weight, weight, bias, *frozen,
            *(small.get(key) for key in SwitchableNormFunction._SAVED),
        )  # fmt: skip
        ctx.names, ctx.bn_mode, ctx.count, ctx.recompute = names, bn_mode, count, recompute
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        inputs = saved[:5]
        x, mean_weight, var_weight, weight, bias = inputs
        tail = (None,) * 7
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain graph
            rm, rv = saved[5], saved[6]
            grads = composite_grads(
                ctx.needs_input_grad, dy, lambda *i: ctx.recompute(*i, rm, rv), *inputs
            )
            return grads + tail
        s = dict(zip(SwitchableNormFunction._SAVED, saved[7:], strict=True))
        needs = ctx.needs_input_grad
        n, c = x.shape[:2]
        sums = dot_sums(dy, x, per_sample=True, shift=s["shift_x"])
        s0, s1 = (t.reshape(n, c) for t in sums)  # Σdy, Σdy·u: (N, C)

        # y = (u − M)·A + β with A = γ·r, r = (max(V, 0) + ε)^(−1/2):
        #   h = Σ dy·(u − M) = Σdy·u − M·Σdy                  (= ∂L/∂A)
        #   ∂L/∂β = Σ_n Σdy,   ∂L/∂γ = Σ_n h·r,   ∂L/∂M = −A·Σdy,
        #   ∂L/∂V = h·γ·(−½ r³) where V ≥ 0 (clamp_min lets V = 0 through), else 0.
        r, a = s["r"], s["a"]
        h = torch.addcmul(s1, s["M"], s0, value=-1)
        d_w = (h * r).sum(0).to(weight.dtype) if weight is not None and needs[3] else None
        d_b = s0.sum(0).to(bias.dtype) if bias is not None and needs[4] else None
        if not (needs[0] or needs[1] or needs[2]):
            return (None, None, None, d_w, d_b) + tail
        d_var = h * (a * r).mul_(r).mul_(-0.5)  # h·γ·r³·(−½)
        if ctx.bn_mode == "running":  # only running_var can make V negative
            d_var = d_var.masked_fill_(s["V"] < 0, 0.0)
        d_mean = (a * s0).neg_()
        # The weights over each normalizer's group size (1 for IN, C for LN, N for BN).
        size = r.new_tensor([{"in": 1, "ln": c, "bn": n}[k] for k in ctx.names])
        s["wm_g"], s["wv_g"] = s["wm"] / size, s["wv"] / size
        d_mu, d_v, d_lm, d_lv = _mix_backward(d_mean, d_var, s, ctx.names, ctx.bn_mode)
        dx = None
        if needs[0]:
            # μ = Σu/L and v = Σu²/L − μ² give ∂μ/∂x = 1/L and ∂v/∂x = 2(u − μ)/L:
            #   dx = A·dy + (2·dv/L)·(u − μ) + dμ/L = u·P + Q + A·dy,
            #   P = 2·dv/L,  Q = dμ/L − P·μ.
            count = ctx.count
            p = d_v.mul_(2.0 / count)
            q = torch.addcmul(d_mu.div_(count), p, s["mu"], value=-1)
            u = centered(x, s["shift_x"])
            dx = apply_dx(u, dy, *(against(t, x) for t in (a, p, q)), x.dtype)
        d_lm = d_lm.to(mean_weight.dtype) if needs[1] else None
        d_lv = d_lv.to(var_weight.dtype) if needs[2] else None
        return (dx, d_lm, d_lv, d_w, d_b) + tail
