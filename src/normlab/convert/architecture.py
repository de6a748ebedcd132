"""What a norm conversion changes in the architecture, beyond the normalization itself.

A BatchNorm is linear in eval mode. Some targets are not: FRN with its TLU
(``max(y, τ)``, τ initialised to 0, so a fresh one is a ReLU) and EvoNorm-B0 /
S0 fold an activation into the norm. After a BatchNorm that is followed by an
activation this is a mild change; after one that is not — a residual branch's
last BN, whose output is added to the skip path, or a linear bottleneck — it
inserts a nonlinearity the architecture deliberately lacks (with τ = 0 a
residual branch can only add, never subtract). Which BatchNorms are followed by
an activation is read from a ``torch.fx`` trace of the model (looking through
identity and dropout layers); a model that does not trace is reported without
that split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from torch import fx, nn

from ..kinds import is_norm_act
from .surgery import Replacement, iter_matches

_ACT_NAMES = {
    "relu", "relu_", "relu6", "silu", "silu_", "swish", "gelu", "hardswish", "hardswish_",
    "hardsigmoid", "mish", "leaky_relu", "leaky_relu_", "leakyrelu", "elu", "elu_", "selu",
    "celu", "prelu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_",
    "softplus", "gelutanh", "quickgelu", "tlu", "rrelu",
}  # fmt: skip


def adds_nonlinearity(layer: nn.Module) -> str | None:
    """How ``layer`` is nonlinear as a function of its input in eval mode, or None if linear."""
    name = type(layer).__name__
    if "FilterResponse" in name and getattr(layer, "tau", None) is not None:
        return "TLU max(y, tau) inside the norm (tau starts at 0: a ReLU)"
    if "EvoNorm" in name and getattr(layer, "apply_act", True):
        if "B0" in name:
            return "EvoNorm-B0 x / max(batch std, v*x + instance std)"
        return "EvoNorm-S0 x * sigmoid(v*x) / group std"
    return None


def _is_activation_module(m: nn.Module) -> bool:
    return type(m).__name__.lower() in _ACT_NAMES


def _is_passthrough_module(m: nn.Module) -> bool:
    """Identity and dropout-style layers (Dropout, DropBlock, DropPath): not a change of kind."""
    return isinstance(m, nn.Identity) or "Drop" in type(m).__name__


def _is_activation_node(node: fx.Node, modules: dict[str, nn.Module], depth: int = 0) -> bool:
    """True when ``node`` is an activation, or an identity / dropout whose users all are."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        if _is_passthrough_module(m) and node.users and depth < 4:
            return all(_is_activation_node(u, modules, depth + 1) for u in node.users)
        return _is_activation_module(m)
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").lower() in _ACT_NAMES
    if node.op == "call_method":
        return str(node.target).lower() in _ACT_NAMES
    return False


def activation_after(
    model: nn.Module, match: Callable[[nn.Module], bool]
) -> dict[str, bool] | None:
    """For each matching layer (by first path): is every use of its output an activation?

    A norm + activation layer counts as followed by one unless its ``act`` is an
    ``nn.Identity``. None when the model does not trace with ``torch.fx``.
    """
    targets = {id(m): p for p, m in iter_matches(model, match)}
    if not targets:
        return {}

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if id(m) in targets or _is_activation_module(m) or _is_passthrough_module(m):
                return True
            return super().is_leaf_module(m, qualname)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # any model fx cannot trace: the split is simply unknown
        return None
    modules = dict(model.named_modules())
    after: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        m = modules.get(str(node.target))
        if m is None or id(m) not in targets:
            continue
        path = targets[id(m)]
        if is_norm_act(m):
            followed = not isinstance(m._modules["act"], nn.Identity)
        else:
            followed = bool(node.users) and all(_is_activation_node(u, modules) for u in node.users)
        after[path] = after.get(path, True) and followed
    return after


def summarise(
    replacements: Sequence[Replacement], act_after: dict[str, bool] | None, target: str
) -> list[str]:
    """Warnings for the architectural changes recorded in ``replacements``' details."""
    out: list[str] = []
    nonlinear = [r for r in replacements if "nonlinearity" in r.details]
    if nonlinear:
        kind = nonlinear[0].details["nonlinearity"]
        msg = f"{target} adds a nonlinearity ({kind}) at {len(nonlinear)} layer(s)"
        if act_after is None:
            msg += (
                "; the model does not trace with torch.fx, so which of them had no "
                "activation after the BatchNorm (residual-branch ends, linear bottlenecks) "
                "is unknown"
            )
        else:
            linear = []
            for r in nonlinear:
                if r.path in act_after:
                    r.details["activation_after_bn"] = act_after[r.path]
                    if not act_after[r.path]:
                        linear.append(r.path)
            msg += (
                f"; {len(linear)} of them had no activation after the BatchNorm "
                "(residual-branch ends, linear bottlenecks), and now apply one"
                + (f": {_names(linear)}" if linear else "")
            )
        out.append(
            msg + ". To keep the architecture use 'frn_linear' (FRN without TLU) or a linear "
            "norm ('gn', 'ln', 'in'); keep this target only if the change is intended."
        )
    narrow = [r for r in replacements if "channels_per_group" in r.details]
    if narrow:
        layers = [
            f"{r.path or '<model>'} (C={r.details['num_groups'] * r.details['channels_per_group']}"
            f", {r.details['num_groups']} groups)"
            for r in narrow
        ]
        out.append(
            f"{len(narrow)} layer(s) got at most 2 channels per group, so they normalize "
            f"almost per channel, like an InstanceNorm: {_names(layers)}. Pass num_groups= "
            "(groups= for evonorm_s0) with fewer groups, or use 'ln', if that is not intended."
        )
    return out


def _names(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(p or "<model>" for p in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
