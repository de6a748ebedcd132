"""A small ResNet for the lab, with the norm layer chosen by registry name.

Layout: a 3×3 stem conv, then one stage per entry of ``widths``; the first stage keeps
the resolution and every later one halves it (stride-2 first conv and a 1×1 stride-2
projection shortcut). Each stage holds ``blocks`` basic blocks (conv-norm-ReLU-conv-norm
+ shortcut, ReLU). Global average pooling and a linear classifier close it. With FRN
the TLU inside each FRN layer is the activation: no ReLU follows a norm (the ReLU after
the residual sum stays).

With 16×16 inputs, a stride-2 stem (the lab's default) and four stages (8, 4, 2, 1), or a
stride-1 stem and five stages, the last stage runs at 1×1, as real backbones do at
their deepest stage (ResNet-50 ends at 7×7 for ImageNet; at batch 2 that is 98 values
per BN statistic). What governs BN's small-batch penalty is the number of values behind
each batch statistic at the deepest norm layers, N × H × W: :func:`final_spatial_size`
gives H = W so that reports can say it.

Lab names may carry a suffix: ``"bn+recal"`` and ``"bn+recal-pb"`` (BN whose running
statistics the trainer recomputes before evaluation, with the population or the
per-batch variance; :data:`RECALIBRATED`) and ``"<norm>+sync"`` for a batch-statistics
layer (``bn``, ``sn``, ``mabn``, ``brn``, ``evonorm_b0``) whose statistics are
synchronized over the default process group (:func:`normlab.distributed.convert_sync`;
a no-op on one process).

Norm ``"mabn"`` is meant to follow a weight-centralized conv: when ``normlab.nn`` has
``CenteredConv2d``, the convs that feed a MABN layer use it (otherwise plain convs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...nn.traits import traits_of
from ...registry import NORM_LAYERS, auto_groups, create_norm, rank_matched

__all__ = [
    "CHANNEL_SEPARABLE",
    "PackedLinear",
    "ResNet",
    "SplitNorm",
    "build_model",
    "canonical_norm",
    "final_spatial_size",
    "is_synced",
    "sync_if_asked",
    "recal_variance",
    "resolve_norm",
]

#: Lab-only variants: ``name -> registry layer``. ``bn+recal`` and ``bn+recal-pb`` train
#: exactly like BN; the trainer recalibrates their running statistics before evaluation.
#: ``bn_eval`` (detection only, :mod:`normlab.lab.run.pretrain`): a pretrained BN whose
#: statistics are frozen for fine-tuning.
VARIANTS = {"bn+recal": "bn", "bn+recal_pb": "bn", "bn_eval": "bn"}
#: Recalibrated variants -> the ``variance`` estimator the trainer passes to
#: :func:`normlab.recalibrate.recalibrate` (precise BN) before each evaluation: the
#: pooled variance of all values (``bn+recal``) or the mean of the per-batch variances
#: (``bn+recal-pb``, what BN's moving average estimates).
RECALIBRATED = {"bn+recal": "population", "bn+recal_pb": "per_batch"}
#: How each variant is written (the README's spelling), by its case- and dash-folded form.
_VARIANT_SPELLING = {"bn+recal": "bn+recal", "bn+recal_pb": "bn+recal-pb", "bn_eval": "bn_eval"}


def _known_names() -> list[str]:
    variants = set(_VARIANT_SPELLING.values())
    return sorted(set(NORM_LAYERS) | variants | {f"{n}+sync" for n in SYNCABLE})


def _folded(name: str) -> str:
    """``name`` with case and ``-``/``_`` folded: the form every lookup uses."""
    if not isinstance(name, str):
        raise ValueError(f"a norm name is a string such as 'bn', got {name!r}")
    return name.strip().lower().replace("-", "_")


def resolve_norm(name: str) -> str:
    """Registry name behind a lab norm name (``"bn+recal"``, ``"bn+sync"`` -> ``"bn"``)."""
    key = _folded(name)
    base = VARIANTS.get(key, key)
    if base.endswith("+sync"):
        base = base[: -len("+sync")]
        if base not in SYNCABLE:
            raise ValueError(
                f"norm {name!r}: '+sync' applies to layers with batch statistics "
                f"({', '.join(SYNCABLE)}); {base!r} has none to synchronize"
            )
    if base not in NORM_LAYERS:
        raise ValueError(
            f"unknown norm {name!r}: not in normlab.registry.NORM_LAYERS. "
            f"Known names: {', '.join(_known_names())}"
        )
    return base


def canonical_norm(name: str) -> str:
    """The one spelling of a lab norm name, made before any run key: case, spaces and
    ``-``/``_`` folded to the registry's names and the README's variants (``"BN"`` ->
    ``"bn"``, ``"bn+recal_pb"`` -> ``"bn+recal-pb"``, ``"EvoNorm-B0+Sync"`` ->
    ``"evonorm_b0+sync"``), so that one method is never stored under two names.

    Raises:
        ValueError: the name is not a lab norm (see :func:`resolve_norm`).
    """
    resolve_norm(name)
    key = _folded(name)
    synced = key.endswith("+sync")
    base = key[: -len("+sync")] if synced else key
    return _VARIANT_SPELLING.get(base, base) + ("+sync" if synced else "")


def recal_variance(name: str) -> str | None:
    """The recalibration variance of a recalibrated lab norm (see :data:`RECALIBRATED`);
    None for a norm the trainer does not recalibrate."""
    return RECALIBRATED.get(_folded(name))


def is_synced(name: str) -> bool:
    """True for a ``"<norm>+sync"`` lab name."""
    return _folded(name).endswith("+sync")


def sync_if_asked(model: nn.Module, norm: str) -> nn.Module:
    """``model`` with its norms synchronized over the default process group for a
    ``+sync`` norm (global-batch statistics under torchrun), else as it is."""
    if is_synced(norm):
        from ...distributed import convert_sync

        convert_sync(model, "world")
    return model


class SplitNorm(nn.Module):
    """S norm layers side by side: seed s's layer normalizes channels [s·C, (s+1)·C).

    For norms that mix channels (LN, SN's layer branch) or carry a per-layer scalar
    (SN's mixing weights, FRN's learned ε), which one layer of S·C channels would share.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.seeds = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(len(self.seeds), dim=1)
        return torch.cat([m(c) for m, c in zip(self.seeds, chunks, strict=True)], dim=1)


def _norm(name: str, channels: int, packs: int = 1) -> nn.Module:
    if packs > 1:
        if name in CHANNEL_SEPARABLE:
            return _norm_packed(name, channels, packs)
        return SplitNorm([_norm(name, channels) for _ in range(packs)])
    if name == "gn":
        # The paper's G = 32, but at least 4 channels per group in the narrow early stages
        # (at 16 channels G = 32 would make GN an InstanceNorm).
        return create_norm("gn", channels, num_groups=auto_groups(channels, min(32, channels // 4)))
    if name == "frn":
        # The FRN paper: on 1×1 maps x/sqrt(x² + ε) is nearly sign(x) unless ε is
        # learned; our last stage is 1×1, so the lab always learns it.
        return create_norm("frn", channels, learnable_eps=True)
    return create_norm(name, channels)


def _norm_packed(name: str, channels: int, packs: int) -> nn.Module:
    """One layer of ``packs · channels`` channels; grouped norms get ``packs ×`` the groups."""
    if name == "gn":
        groups = auto_groups(channels, min(32, channels // 4))
        return create_norm("gn", packs * channels, num_groups=packs * groups)
    if name == "evonorm_s0":
        return create_norm(name, packs * channels, groups=packs * auto_groups(channels))
    return create_norm(name, packs * channels)


def _lab_traits(trait: str) -> tuple[str, ...]:
    """The lab's norm names (registry names of 2-D layers, in registry order) whose layer,
    as the lab builds it, has ``trait`` (see :mod:`normlab.nn.traits`)."""
    names = [n for n, f in NORM_LAYERS.items() if rank_matched(f, 2) is f]
    return tuple(n for n in names if getattr(traits_of(_norm(n, 8)), trait, False))


#: Lab norm names whose layers take ``process_group`` and so have a ``+sync`` variant.
SYNCABLE = _lab_traits("syncable")
#: Norms whose every statistic and parameter is per channel (or per group of channels):
#: S seeds' layers of C channels are exactly one layer of S·C channels (S·G groups).
CHANNEL_SEPARABLE = frozenset(_lab_traits("channel_separable"))


def _activation_after(norm: str) -> nn.Module:
    """ReLU after a norm, except after FRN, whose TLU is the activation (FRN+TLU replaces
    BN+ReLU in the FRN paper). A ReLU on top of a TLU that starts at τ = 0 would pass τ
    gradient only where rounding noise had pushed τ above 0."""
    return nn.Identity() if norm == "frn" else nn.ReLU(inplace=True)


def _conv(norm: str, cin: int, cout: int, k: int, stride: int, packs: int = 1) -> nn.Module:
    conv_cls: type[nn.Conv2d] = nn.Conv2d
    if norm == "mabn":
        from ... import nn as nnl

        conv_cls = getattr(nnl, "CenteredConv2d", nn.Conv2d)
    return conv_cls(
        packs * cin, packs * cout, k, stride=stride, padding=k // 2, groups=packs, bias=False
    )


class PackedLinear(nn.Module):
    """S linear heads side by side: (N, S·C) -> (S, N, K); weight (S·K, C), bias (S·K)."""

    def __init__(self, in_features: int, out_features: int, packs: int) -> None:
        super().__init__()
        self.packs, self.in_features, self.out_features = packs, in_features, out_features
        heads = [nn.Linear(in_features, out_features) for _ in range(packs)]
        self.weight = nn.Parameter(torch.cat([h.weight.detach() for h in heads]))
        self.bias = nn.Parameter(torch.cat([h.bias.detach() for h in heads]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, c, k = self.packs, self.in_features, self.out_features
        feats = x.view(x.shape[0], s, c).transpose(0, 1)  # (S, N, C)
        w = self.weight.view(s, k, c).transpose(1, 2)  # (S, C, K)
        return torch.baddbmm(self.bias.view(s, 1, k), feats, w)


class BasicBlock(nn.Module):
    def __init__(self, norm: str, cin: int, cout: int, stride: int, packs: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(norm, cin, cout, 3, stride, packs)
        self.norm1 = _norm(norm, cout, packs)
        self.conv2 = _conv(norm, cout, cout, 3, 1, packs)
        self.norm2 = _norm(norm, cout, packs)
        self.act = nn.ReLU(inplace=True)
        self.act1 = _activation_after(norm)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                _conv(norm, cin, cout, 1, stride, packs), _norm(norm, cout, packs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet: stem, ``len(widths)`` stages of ``blocks`` basic blocks, linear head.

    ``packs`` = S > 1 builds S independent networks side by side in one (see
    :mod:`normlab.lab.run.packed`): grouped convs with ``groups=S``, norms of S·C channels (or
    S separate layers for norms that mix channels), input (N, S·C_in, H, W) holding each
    network's own images, output logits (S, N, K).
    """

    def __init__(
        self,
        norm: str,
        *,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128, 128),
        blocks: int = 1,
        packs: int = 1,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage")
        if packs < 1:
            raise ValueError(f"packs must be >= 1, got {packs}")
        self.packs = packs
        self.stem = nn.Sequential(
            _conv(norm, in_channels, widths[0], 3, stem_stride, packs),
            _norm(norm, widths[0], packs),
            _activation_after(norm),
        )
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers = [
                BasicBlock(norm, cin if j == 0 else w, w, 2 if (i and not j) else 1, packs)
                for j in range(blocks)
            ]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head: nn.Module = (
            nn.Linear(cin, num_classes) if packs == 1 else PackedLinear(cin, num_classes, packs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def final_spatial_size(image_size: int, num_stages: int, stem_stride: int = 1) -> int:
    """H (= W) of the last stage for a square input (each stride-2 conv: ceil(h / 2))."""
    h = -(-image_size // stem_stride)
    for _ in range(num_stages - 1):
        h = (h + 1) // 2
    return h


def build_model(
    norm: str,
    *,
    in_channels: int,
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64, 128, 128),
    blocks: int = 1,
    packs: int = 1,
    stem_stride: int = 1,
) -> ResNet:
    """The lab's ResNet with every norm layer built by ``create_norm(resolve_norm(norm), C)``.

    A ``"+sync"`` name gets its layers synchronized over the default process group.
    ``packs`` > 1: that many independent networks side by side (see :class:`ResNet`).
    """
    model = ResNet(
        resolve_norm(norm),
        in_channels=in_channels,
        num_classes=num_classes,
        widths=widths,
        blocks=blocks,
        packs=packs,
        stem_stride=stem_stride,
    )
    return sync_if_asked(model, norm)
