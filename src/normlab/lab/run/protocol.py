"""A run's protocol: every setting that changes what a number in the report means.

A report cell averages the seeds of one norm at one batch size. Averaging is only
sound when the seeds were trained the same way, so the store and the report group runs
by *protocol*: every :class:`~normlab.lab.run.train.RunConfig` field except the grid's
coordinates (norm, batch size, seed), the rank count (already part of a row's label,
``bn×2``) and the device (which does not change what is measured). A field added to
``RunConfig`` later is part of the protocol without any change here: so is a user's
model (``model``, ``model_hash``): seeds of two models, or of two versions of one
model's source file, are never averaged into one cell.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .train import RunConfig

__all__ = [
    "NOT_PROTOCOL",
    "describe_difference",
    "differing_fields",
    "protocol_key",
    "protocol_names",
    "protocol_of",
]

#: RunConfig fields that are not part of the protocol.
NOT_PROTOCOL = frozenset({"norm", "batch_size", "seed", "ranks", "device"})

Protocol = Mapping[str, Any]


def protocol_of(config: RunConfig) -> dict[str, Any]:
    """The protocol fields of ``config`` and their values (JSON types)."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_PROTOCOL}


def protocol_key(protocol: Protocol) -> str:
    """A canonical string of a protocol: equal keys, equal protocols."""
    return json.dumps(dict(protocol), sort_keys=True, separators=(",", ":"))


def differing_fields(protocols: Sequence[Protocol]) -> list[str]:
    """The fields, sorted, whose value is not the same in every one of ``protocols``."""
    names = sorted({k for p in protocols for k in p})
    return [k for k in names if len({json.dumps(p.get(k)) for p in protocols}) > 1]


#: How ``None`` reads in a protocol field.
_NONE = {
    "data": "embedded",
    "max_train": "all",
    "steps": "off",
    "model": "lab-resnet",
    "data_hash": "unrecorded",
}


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return _NONE.get(name, "none") if value is None else str(value)


def describe_difference(stored: Protocol, new: Protocol) -> str:
    """``"epochs 3 stored vs 1 now; base_lr ..."``: the fields where ``new`` differs."""
    return "; ".join(
        f"{k} {_fmt(k, stored.get(k))} stored vs {_fmt(k, new.get(k))} now"
        for k in differing_fields([stored, new])
    )


def protocol_names(protocols: Iterable[Protocol]) -> dict[str, str]:
    """A short name for each distinct protocol, by :func:`protocol_key`: the fields in
    which the protocols differ (``"epochs=1"``); ``""`` when there is only one."""
    unique = {protocol_key(p): p for p in protocols}
    if len(unique) < 2:
        return dict.fromkeys(unique, "")
    fields = differing_fields(list(unique.values()))
    return {key: ", ".join(f"{k}={_fmt(k, p.get(k))}" for k in fields) for key, p in unique.items()}
