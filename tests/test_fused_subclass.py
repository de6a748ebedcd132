"""Tensor subclasses take the plain autograd path, for every norm with a fused Function.

A ``torch.Tensor`` subclass with ``__torch_function__`` (DTensor and the like)
must see every op of the norm, so the fused CPU Functions (Switchable Norm,
Batch Renorm, FRN, EvoNorm) must step aside for it: one eligibility rule,
:func:`normlab._core.fused.fused_allowed`. The subclass's result must equal the
plain tensor's (fused path) in values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import normlab.functional as NF
from _testing import assert_close, offcenter
from normlab._core.fused import fused_allowed


class Recording(torch.Tensor):
    """A subclass that records the name of every torch function applied to it."""

    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def _custom_nodes(y: torch.Tensor) -> list[str]:
    """Names of the autograd.Function nodes in ``y``'s graph."""
    seen, stack, names = set(), [y.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            names.append(type(node).__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return names


C = 5


def _sn(x, p, state):
    return NF.switchable_norm(
        x, p["lm"], p["lv"], p["w"], p["b"], running_mean=state[0], running_var=state[1]
    )


def _brn(x, p, state):
    return NF.batch_renorm(x, state[0], state[1], p["w"], p["b"], training=True, r_max=1.5)


def _frn(x, p, state):
    return NF.frn_tlu(x, p["w"], p["b"], p["tau"])


def _b0(x, p, state):
    return NF.evonorm_b0(x, None, p["v"], p["w"], p["b"], training=True)


def _s0(x, p, state):
    return NF.evonorm_s0(x, 1, p["v"], p["w"], p["b"])


CASES: dict[str, Callable] = {"sn": _sn, "brn": _brn, "frn_tlu": _frn, "b0": _b0, "s0": _s0}


def _params(seed: int) -> dict[str, torch.Tensor]:
    p = {
        "lm": offcenter(3, seed=seed, loc=0.0, scale=0.5),
        "lv": offcenter(3, seed=seed + 1, loc=0.0, scale=0.5),
        "w": offcenter(C, seed=seed + 2, loc=1.0, scale=0.3),
        "b": offcenter(C, seed=seed + 3, loc=0.2, scale=0.3),
        "tau": offcenter(C, seed=seed + 4, loc=-0.5, scale=0.2),
        "v": offcenter(C, seed=seed + 5, loc=0.7, scale=0.2),
    }
    return {k: t.requires_grad_() for k, t in p.items()}


def _run(name: str, subclass: bool, seed: int):
    x = offcenter(3, C, 4, 3, seed=seed, loc=1e2, scale=3.0).requires_grad_()
    p = _params(seed + 10)
    state = (
        offcenter(C, seed=seed + 20, loc=1e2, scale=1.0),
        offcenter(C, seed=seed + 21, loc=9.0, scale=1.0).abs(),
    )
    x_in = x.as_subclass(Recording) if subclass else x
    Recording.calls = []
    y = CASES[name](x_in, p, state)
    nodes = _custom_nodes(y)
    dy = offcenter(*y.shape, seed=seed + 30, loc=0.3, scale=1.0)
    leaves = [x, *p.values()]
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return y.detach().as_subclass(torch.Tensor), grads, state, nodes, list(Recording.calls)


@pytest.mark.parametrize("name", sorted(CASES))
def test_subclass_takes_the_plain_path_with_the_same_results(name: str) -> None:
    y_plain, g_plain, state_plain, nodes_plain, _ = _run(name, subclass=False, seed=7)
    y_sub, g_sub, state_sub, nodes_sub, calls = _run(name, subclass=True, seed=7)
    assert nodes_plain, "a plain CPU tensor should take the fused Function"
    assert not nodes_sub, f"the subclass took a fused Function: {nodes_sub}"
    assert len(calls) > 5, "the subclass should see the plain path's ops"
    assert_close(y_sub, y_plain)
    for a, e in zip(g_sub, g_plain, strict=True):
        assert (a is None) == (e is None)
        if a is not None:
            assert_close(a.as_subclass(torch.Tensor), e)
    for a, e in zip(state_sub, state_plain, strict=True):  # running statistics updated alike
        assert_close(a, e)


def test_fused_allowed_rule() -> None:
    x = offcenter(2, 3, 4, seed=1)
    assert fused_allowed(x, None, x)
    assert not fused_allowed(x.as_subclass(Recording))
    assert not fused_allowed(x, x.as_subclass(Recording))  # a subclass parameter counts too
    assert not fused_allowed(x[:0])  # empty input
    assert not fused_allowed(x.to("meta"))
    with torch.autograd.forward_ad.dual_level():
        assert not fused_allowed(x)
    assert torch.func.vmap(lambda t: torch.tensor(fused_allowed(t)))(x).logical_not().all()
