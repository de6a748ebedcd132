"""Seeds side by side: S independent lab networks packed into one model.

A sweep's seeds share everything but their initial weights and data order, and at the
lab's small batches a training step costs mostly per-operator overhead, not arithmetic.
Packing S seeds into one network (:class:`normlab.lab.models.resnet.ResNet` with ``packs=S``)
runs S training steps for about the overhead of one:

* conv: one conv with ``groups=S`` (seed s owns output channels ``[s·C, (s+1)·C)`` and
  sees only its own input channels);
* norm: per-channel norms (:data:`normlab.lab.models.resnet.CHANNEL_SEPARABLE`) become one layer
  of S·C channels (S·G groups for GN); the others (SN, LN, FRN with its learned scalar
  ε) stay S layers, each on its seed's channels (:class:`normlab.lab.models.resnet.SplitNorm`);
* head: S linear heads in one batched matmul; logits (S, N, K).

No operator mixes seeds, and the loss is the sum of the seeds' losses, so each seed's
gradient, SGD update (momentum, weight decay) and running statistics are exactly those
of its own run; only floating-point rounding differs (grouped convs sum in another
order). ``tests/lab/test_packed.py`` trains each lab norm both ways and compares.

:func:`pack_states` builds the packed weights from S ordinary models (each initialized
with its own seed, as an unpacked run would be); :func:`unpack_state` gives seed s's
weights back as an ordinary model's ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["pack_states", "unpack_state"]


def _split_key(key: str) -> tuple[int, str] | None:
    """``"a.seeds.2.weight"`` -> ``(2, "a.weight")`` for a :class:`SplitNorm` entry."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "seeds" and parts[i + 1].isdigit():
            return int(parts[i + 1]), ".".join(parts[:i] + parts[i + 2 :])
    return None


def _packed_dim(packed: torch.Tensor, plain: torch.Tensor, packs: int, key: str) -> int | None:
    """The dim along which ``packed`` holds ``packs`` copies of ``plain``; None if equal shape."""
    if packed.shape == plain.shape:
        return None
    dims = [
        d
        for d in range(packed.ndim)
        if packed.ndim == plain.ndim
        and packed.shape[d] == packs * plain.shape[d]
        and all(packed.shape[e] == plain.shape[e] for e in range(packed.ndim) if e != d)
    ]
    if len(dims) != 1:
        raise ValueError(
            f"cannot pack {key!r}: packed shape {tuple(packed.shape)} is not {packs}× the "
            f"plain shape {tuple(plain.shape)} along exactly one dim"
        )
    return dims[0]


@torch.no_grad()
def pack_states(packed: nn.Module, plains: Sequence[nn.Module]) -> None:
    """Load S ordinary models' parameters and buffers into ``packed`` (in place).

    Raises:
        ValueError: the models do not match the packed layout, or a shared (unpacked)
            buffer differs between the models (e.g. step counters of unequal age).
    """
    states = [p.state_dict() for p in plains]
    packs = len(states)
    for key, target in packed.state_dict(keep_vars=True).items():
        split = _split_key(key)
        if split is not None:
            s, plain_key = split
            target.copy_(states[s][plain_key])
            continue
        sources = [st[key] for st in states]
        dim = _packed_dim(target, sources[0], packs, key)
        if dim is None:
            if any(not torch.equal(sources[0], x) for x in sources[1:]):
                raise ValueError(f"cannot pack {key!r}: it is shared but differs between seeds")
            target.copy_(sources[0])
        else:
            target.copy_(torch.cat(sources, dim=dim))


@torch.no_grad()
def unpack_state(packed: nn.Module, s: int, plain: nn.Module) -> dict[str, torch.Tensor]:
    """Seed ``s``'s ``state_dict`` in ``plain``'s layout, cut out of ``packed``."""
    template = plain.state_dict()
    packs = packed.packs if hasattr(packed, "packs") else None
    out: dict[str, torch.Tensor] = {}
    for key, value in packed.state_dict().items():
        split = _split_key(key)
        if split is not None:
            if split[0] == s:
                out[split[1]] = value.clone()
            continue
        if packs is None:
            raise ValueError("unpack_state needs a model with a `packs` attribute")
        dim = _packed_dim(value, template[key], packs, key)
        out[key] = value.clone() if dim is None else value.chunk(packs, dim=dim)[s].clone()
    missing = set(template) - set(out)
    if missing:
        raise ValueError(f"packed model lacks {sorted(missing)[:3]}…")
    return out
