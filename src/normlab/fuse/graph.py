"""Find which BatchNorm layers are fed by a conv, by tracing the model with torch.fx.

Folding a BN into a conv is only right where the BN's input is exactly that
conv's output and the conv's output goes nowhere else. Module order does not
tell that (a custom ``forward`` may wire anything), the data flow does:
:func:`find_uses` traces the model with :mod:`torch.fx` (convs, linears and
BatchNorms kept as opaque leaves) and reads every BN call off the graph.

Whole-model tracing fails on detectors and on data-dependent control flow, so
where a module does not trace its children are traced one by one (the largest
traceable subtrees). Where nothing traces, a plain ``nn.Sequential`` still
states its data flow: a conv directly followed by a BN in it is a pair. BNs
called only from code that neither traces nor is a Sequential are reported as
not analysed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import fx, nn

from ..kinds import is_batch_norm, is_frozen_batch_norm

__all__ = ["BNUse", "Discovery", "find_uses", "is_bn_like", "is_conv_like"]

_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def is_bn_like(m: nn.Module) -> bool:
    """A BatchNorm or frozen BatchNorm (what fusion folds)."""
    return is_batch_norm(m) or is_frozen_batch_norm(m)


def is_conv_like(m: nn.Module) -> bool:
    """A conv, transposed conv or Linear, or a subclass (checked numerically before folding)."""
    return isinstance(m, _CONV)


@dataclass
class BNUse:
    """One call of a BN found by the analysis: the conv feeding it, or why none can be folded."""

    conv: nn.Module | None
    reason: str = ""  # a key of REASONS when conv is None
    detail: str = ""


@dataclass
class Discovery:
    """What the analysis of a model found."""

    uses: dict[int, list[BNUse]] = field(default_factory=dict)  # id(BN) -> its calls
    conv_calls: dict[int, int] = field(default_factory=dict)  # id(conv) -> calls seen
    traced: list[str] = field(default_factory=list)  # roots traced by torch.fx
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (path, why) that did not
    sequential_fallback: list[str] = field(default_factory=list)  # Sequentials read by order
    covered: set[int] = field(default_factory=set)  # ids of modules inside traced roots
    sequential_ids: set[int] = field(default_factory=set)  # ids of the Sequentials read by order

    def add(self, bn: nn.Module, use: BNUse) -> None:
        self.uses.setdefault(id(bn), []).append(use)


class _Tracer(fx.Tracer):
    """fx tracer keeping convs, linears and BNs (incl. foreign ones) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_bn_like(m) or is_conv_like(m) or super().is_leaf_module(m, module_qualified_name)


def _describe(node: object, root: nn.Module) -> str:
    """A short description of what produced ``node`` (for skip reasons)."""
    if not isinstance(node, fx.Node):
        return f"a constant ({type(node).__name__})"
    if node.op == "call_module":
        return f"{type(root.get_submodule(str(node.target))).__name__} ({node.target})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None) or repr(node.target)
        return f"{getattr(node.target, '__module__', '') or ''}.{name}".lstrip(".")
    if node.op == "call_method":
        return f"the tensor method .{node.target}()"
    if node.op == "placeholder":
        return "an input of the traced module"
    return f"{node.op} {node.target}"


def _read_graph(graph: fx.Graph, root: nn.Module, found: Discovery) -> None:
    mods = {}
    for node in graph.nodes:
        if node.op == "call_module":
            mods[node] = root.get_submodule(str(node.target))
            m = mods[node]
            if is_conv_like(m):
                found.conv_calls[id(m)] = found.conv_calls.get(id(m), 0) + 1
    for node, bn in mods.items():
        if not is_bn_like(bn):
            continue
        src = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("x"))
        if len(node.args) + len(node.kwargs) != 1:
            found.add(bn, BNUse(None, "extra_arguments", "it is called with extra arguments"))
            continue
        conv = mods.get(src) if isinstance(src, fx.Node) else None
        if conv is None or not is_conv_like(conv):
            found.add(bn, BNUse(None, "not_fed_by_conv", f"its input is {_describe(src, root)}"))
            continue
        others = [u for u in src.users if u is not node]
        if others:
            used = ", ".join(sorted({_describe(u, root) for u in others}))
            detail = f"the output of {src.target} is also used by {used}"
            found.add(bn, BNUse(None, "conv_output_reused", detail))
            continue
        found.add(bn, BNUse(conv))


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def find_uses(model: nn.Module) -> Discovery:
    """Trace ``model`` (or its largest traceable subtrees) and list every BN call found."""
    found = Discovery()
    has_bn: set[int] = set()
    paths: dict[int, str] = {}
    for path, m in reversed(list(model.named_modules(remove_duplicate=False))):
        paths[id(m)] = path
    parents: dict[int, list[nn.Module]] = {}
    for parent in model.modules():
        for child in parent.children():
            parents.setdefault(id(child), []).append(parent)
    stack = [m for m in model.modules() if is_bn_like(m)]
    while stack:  # mark every ancestor of a BN
        for parent in parents.get(id(stack.pop()), []):
            if id(parent) not in has_bn:
                has_bn.add(id(parent))
                stack.append(parent)
    visited: set[int] = set()

    def visit(path: str, module: nn.Module) -> None:
        if id(module) in visited or id(module) not in has_bn or is_bn_like(module):
            return
        visited.add(id(module))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = _Tracer().trace(module)
        except Exception as e:  # any failure to trace: descend into the children
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            found.untraced.append((path or "<model>", why[:200]))
        else:
            _read_graph(graph, module, found)
            found.traced.append(path or "<model>")
            found.covered.update(id(m) for m in module.modules())
            return
        if _is_plain_sequential(module):
            kids = [m for m in module._modules.values() if m is not None]
            used = False
            for a, b in zip(kids[:-1], kids[1:], strict=True):
                if is_bn_like(b):
                    used = True
                    if is_conv_like(a):
                        found.add(b, BNUse(a))
                        found.conv_calls[id(a)] = found.conv_calls.get(id(a), 0) + 1
                    else:
                        detail = f"it follows {type(a).__name__} in an nn.Sequential"
                        found.add(b, BNUse(None, "not_fed_by_conv", detail))
            if kids and is_bn_like(kids[0]):
                detail = "it opens an nn.Sequential whose caller did not trace"
                found.add(kids[0], BNUse(None, "not_analysed", detail))
                used = True
            if used:
                found.sequential_fallback.append(path or "<model>")
                found.sequential_ids.add(id(module))
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return found
