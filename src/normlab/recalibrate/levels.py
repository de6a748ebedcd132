"""Dependency levels of a model's normalization layers, read from one traced forward.

Layer B depends on layer A when B's input is computed from A's output; in eval mode B's
recalibrated statistics then depend on A's. Level 0 holds the layers that depend on no
recalibrated layer, level k those whose deepest dependency is at level k − 1; one pass
per level, each writing its statistics before the next, reaches the eval-mode fixed
point. Layers that depend on each other (one called twice in a forward) share a level
marked cyclic, whose pass is repeated. The dependencies come from one forward under
autograd with every layer's output replaced by a fresh leaf that requires grad (a
clone: numerically the same): walking back from a layer's input stops at those leaves.
Dependencies autograd does not record (``detach()``, ``torch.no_grad()``, integer
intermediates) are not seen; ``levels="sequential"`` needs none, and is used when a
layer runs with autograd off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..feed import feed

__all__ = ["Level", "graph_levels", "sequential_levels"]

#: (layer ids of one pass, whether some of them depend on each other)
Level = tuple[list[int], bool]


def _upstream(fn: Any, owners: dict[int, int]) -> set[int]:
    """Ids of the tagged layers whose leaf outputs the autograd node ``fn`` reaches."""
    found: set[int] = set()
    stack, seen = [fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if isinstance(variable, Tensor):
            if id(variable) in owners:
                found.add(owners[id(variable)])
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


def trace(
    model: nn.Module,
    layers: dict[int, nn.Module],
    batch: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
) -> tuple[list[int], dict[int, set[int]], dict[int, int], bool]:
    """Run ``model`` once on ``batch``: layers in first-call order, dependencies, call counts,
    and whether some layer ran with autograd off (its dependencies are then unknown)."""
    owners: dict[int, int] = {}  # id(leaf output) -> layer id
    leaves: list[Tensor] = []  # keeps the leaves (and their ids) alive
    deps: dict[int, set[int]] = {lid: set() for lid in layers}
    order: list[int] = []
    calls: dict[int, int] = {}
    blind = False

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal blind
        blind = blind or not torch.is_grad_enabled() or torch.is_inference_mode_enabled()
        lid = id(module)
        if lid not in calls:
            order.append(lid)
        calls[lid] = calls.get(lid, 0) + 1
        for x in args:
            if isinstance(x, Tensor) and x.requires_grad:
                if x.grad_fn is not None:
                    deps[lid] |= _upstream(x.grad_fn, owners)
                elif id(x) in owners:
                    deps[lid].add(owners[id(x)])

    def post(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if not isinstance(out, Tensor) or not out.is_floating_point() or blind:
            return None
        leaf = out.detach().requires_grad_(True)
        leaves.append(leaf)
        owners[id(leaf)] = id(module)
        return leaf.clone()

    handles = []
    try:
        for m in layers.values():
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        with torch.enable_grad():
            feed(model, batch, forward_fn)
    finally:
        for h in handles:
            h.remove()
    return order, deps, calls, blind


def graph_levels(order: list[int], deps: dict[int, set[int]]) -> list[Level]:
    """Group ``order``'s layers into levels (strongly connected components share one)."""
    # Tarjan's algorithm, iterative; edges point from a layer to what it depends on,
    # so each component is emitted after every component it depends on.
    pos = {lid: i for i, lid in enumerate(order)}
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[int] = []
    components: list[list[int]] = []
    for root in order:
        if root in index:
            continue
        work = [(root, iter(sorted(deps[root], key=pos.__getitem__)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(deps[w], key=pos.__getitem__))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                components.append(comp)
    level_of: dict[int, int] = {}
    levels: list[Level] = []
    for comp in components:
        members = set(comp)
        below = [level_of[d] for v in comp for d in deps[v] if d not in members]
        k = 1 + max(below) if below else 0
        cyclic = len(comp) > 1 or any(v in deps[v] for v in comp)
        for v in comp:
            level_of[v] = k
        while len(levels) <= k:
            levels.append(([], False))
        ids, was_cyclic = levels[k]
        levels[k] = (ids + comp, was_cyclic or cyclic)
    return [(sorted(ids, key=pos.__getitem__), cyclic) for ids, cyclic in levels]


def sequential_levels(order: list[int], calls: dict[int, int]) -> list[Level]:
    """One layer per pass, in first-call order; a layer called more than once is cyclic."""
    return [([lid], calls[lid] > 1) for lid in order]
