"""What :func:`normlab.fuse.fuse_conv_bn` did: folded pairs, skipped BNs and why, how it looked."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["REASONS", "FuseReport", "FusedPair", "SkippedBN"]

#: Why a BatchNorm was not folded: reason key -> what it means.
REASONS: dict[str, str] = {
    "not_fed_by_conv": "its input is not the output of a Conv1d/2d/3d or Linear",
    "conv_output_reused": "the conv's output is also used elsewhere (a skip, a second branch)",
    "conv_shared": "the conv is registered or called more than once (folding would untie it)",
    "bn_shared": "the BN is also used where it cannot be folded",
    "extra_arguments": "the BN is called with more than one argument",
    "training_mode": "the BN is in training mode (it normalizes with batch statistics)",
    "no_running_stats": "the BN keeps no running statistics",
    "channel_mismatch": "the conv's output channels differ from the BN's",
    "conv_transforms_weight": "the conv subclass transforms its weight in forward",
    "bn_variant": "the BN does not compute the standard BatchNorm formula",
    "runtime_wiring": "on check_inputs the BN did not run on its conv's output",
    "not_called": "the traced forward never calls the BN",
    "not_analysed": "it is called from code torch.fx could not trace, outside an nn.Sequential",
    "model_is_bn": "the model itself is the BN; there is no conv to fold it into",
    "filtered": "left out by include= / exclude=",
}


@dataclass
class FusedPair:
    """One folded pair: ``conv`` now holds the BN; ``bn``'s slot holds ``replacement``."""

    conv: str
    bn: str
    conv_type: str
    bn_type: str
    replacement: str


@dataclass
class SkippedBN:
    """A BatchNorm left in place, with the reason key (see :data:`REASONS`) and specifics."""

    bn: str
    bn_type: str
    reason: str
    detail: str


@dataclass
class FuseReport:
    """The outcome of one fusion: what was folded, what was not and why, how it was analysed.

    ``traced`` lists the modules torch.fx traced (``"<model>"`` for the whole
    model); ``untraced`` the modules that did not trace, with the tracer's
    error; ``sequential_fallback`` the ``nn.Sequential`` containers read by
    module order because they did not trace; ``check`` says what the
    ``check_inputs`` check compared.
    """

    fused: list[FusedPair] = field(default_factory=list)
    skipped: list[SkippedBN] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)
    untraced: list[tuple[str, str]] = field(default_factory=list)
    sequential_fallback: list[str] = field(default_factory=list)
    check: str = "no check_inputs: only the per-pair probe check ran"

    @property
    def folded_bns(self) -> int:
        """Distinct BatchNorm modules folded (a BN shared by two convs counts once)."""
        return len({p.bn for p in self.fused})

    @property
    def total_bns(self) -> int:
        """Distinct BatchNorm modules in the model."""
        return self.folded_bns + len(self.skipped)

    def counts(self) -> dict[str, int]:
        """Skipped BNs per reason key."""
        return dict(Counter(s.reason for s in self.skipped))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return {
            "total_bns": self.total_bns,
            "folded_bns": self.folded_bns,
            "skipped_by_reason": self.counts(),
            "fused": [asdict(p) for p in self.fused],
            "skipped": [asdict(s) for s in self.skipped],
            "traced": list(self.traced),
            "untraced": [list(u) for u in self.untraced],
            "sequential_fallback": list(self.sequential_fallback),
            "check": self.check,
        }

    def summary(self) -> str:
        """One line: folded / total and the skips by reason."""
        skips = ", ".join(f"{n} {r}" for r, n in sorted(self.counts().items()))
        return (
            f"folded {self.folded_bns} of {self.total_bns} BatchNorm layers "
            f"({len(self.fused)} conv+BN pairs)" + (f"; skipped: {skips}" if skips else "")
        )

    def __str__(self) -> str:
        lines = [f"fuse_conv_bn: {self.summary()}"]
        if self.traced:
            shown = ", ".join(self.traced[:8]) + (" ..." if len(self.traced) > 8 else "")
            lines.append(f"  traced with torch.fx ({len(self.traced)}): {shown}")
        if self.untraced:
            lines.append(f"  did not trace ({len(self.untraced)}; their children were traced):")
            lines += [f"    {path}: {why}" for path, why in self.untraced]
        if self.sequential_fallback:
            lines.append("  read by module order (nn.Sequential that did not trace):")
            lines += [f"    {path}" for path in self.sequential_fallback]
        if self.skipped:
            lines.append("  skipped:")
            lines += [f"    {s.bn} ({s.bn_type}): {s.reason}: {s.detail}" for s in self.skipped]
        if self.fused:
            lines.append("  folded:")
            lines += [f"    {p.conv} <- {p.bn} (now {p.replacement})" for p in self.fused]
        lines.append(f"  check: {self.check}")
        return "\n".join(lines)
