"""A pretrained backbone for detection, and the norm treatments of fine-tuning it.

Every detector is fine-tuned from a backbone pretrained on other images; only then does
FrozenBN mean anything. The lab's protocol (``RunConfig.pretrain``, a :func:`spec`
string such as ``"animal-mnist:size=24,batch=64,epochs=4,lr=0.1,train=8000"``):

1. **Pretraining**, once per norm *family* (:func:`family`: ``bn`` for every BN
   treatment, else the registry norm): the detector's backbone
   (:class:`normlab.lab.models.detector.Backbone`, RGB input) with a pooled linear head
   (:class:`~normlab.lab.models.detector.Classifier`) is trained by the lab's one loop on
   the embedded Animal-MNIST classification images (grayscale repeated to RGB, resized to
   ``size``, the first ``train`` training images) at batch ``batch`` for ``epochs`` epochs,
   seed 0, lr ``lr · batch / 32``: a large batch, where BN works. The backbone's weights
   and buffers are stored in a cache file keyed by the family, the backbone's widths, the
   spec and the classification data's hash (``$NORMLAB_CACHE``, default
   ``~/.cache/normlab``, under ``pretrain/``), written atomically under a file lock, and
   reused by every run like a public checkpoint. A run's seed varies the neck's and
   head's initialization and the batch order only.
2. **Fine-tuning** at the grid's batch sizes, the treatment being the run's norm name:
   ``bn`` (the pretrained BN trained on at the small batch), ``frozen_bn`` (statistics
   and affine frozen: the backbone's BNs become FrozenBatchNorm, detectron2's default),
   ``bn_eval`` (statistics frozen, affine trainable: ``freeze_bn(stats_only=True)``,
   mmdet's ``norm_eval``), ``bn+recal`` (the statistics re-estimated on the detection
   training images with precise BN, :func:`normlab.recalibrate.recalibrate`, then frozen
   as ``frozen_bn``: the remedy for a domain shift), ``gn`` (the GN-pretrained backbone,
   GN in neck and head) and any registry norm (pretrained with that norm). The neck and
   head always have fresh layers of the family's norm, trained.

For the frozen treatments the builder measures, per BN of the backbone in depth order,
how far the frozen statistics are from those of the detection training images that
reach it (the doctor's staleness measure, :func:`normlab.doctor.staleness.stale_distance`:
the median over channels of the RMS gap in the normalized output; None where the gap is
within the images' own sampling noise) and keeps it in the run's record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.images import Split, load_split
from ..defaults import DETECTION_FROZEN
from ..models.detector import Backbone, Classifier, build_detector
from ..models.resnet import resolve_norm, sync_if_asked
from .config import RunConfig
from .loop import train_loop

__all__ = [
    "DEFAULT_PRETRAIN",
    "FROZEN_TREATMENTS",
    "DetectionBuilder",
    "family",
    "pretrained_backbone",
    "spec",
    "staleness",
]

#: The default pretraining protocol of ``normlab sweep --task detection``.
DEFAULT_PRETRAIN = "animal-mnist:size=24,batch=64,epochs=4,lr=0.1,train=8000"
#: Treatments that freeze the pretrained statistics: meaningless without pretraining.
FROZEN_TREATMENTS = DETECTION_FROZEN
_FIELDS = {"size": int, "batch": int, "epochs": int, "lr": float, "train": int}


def spec(text: str) -> dict[str, Any]:
    """The fields of a pretraining spec string (module docstring).

    Raises:
        ValueError: not ``animal-mnist:`` followed by every field of the default.
    """
    source, _, rest = text.partition(":")
    try:
        fields = dict(p.split("=", 1) for p in rest.split(","))
        parsed = {k: _FIELDS[k](fields[k]) for k in _FIELDS}
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"pretraining spec {text!r} is not understood; write it as {DEFAULT_PRETRAIN!r}"
        ) from e
    if source != "animal-mnist" or set(fields) != set(_FIELDS):
        raise ValueError(f"pretraining spec {text!r}: use the form {DEFAULT_PRETRAIN!r}")
    return parsed


def family(treatment: str) -> str:
    """The norm a treatment's backbone is pretrained (and its head built) with."""
    return "bn" if treatment in FROZEN_TREATMENTS else resolve_norm(treatment)


def _cache_dir() -> Path:
    return Path(os.environ.get("NORMLAB_CACHE", Path.home() / ".cache" / "normlab")) / "pretrain"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rgb(split: Split) -> Split:
    def rgb(x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x

    return dataclasses.replace(split, x_train=rgb(split.x_train), x_test=rgb(split.x_test))


def pretrained_backbone(
    norm: str, widths: tuple[int, ...], protocol: str
) -> tuple[dict[str, torch.Tensor], float]:
    """The pretrained backbone's state_dict and its classification test error (%), from
    the cache or trained now (module docstring); the caller's RNG state is untouched."""
    p = spec(protocol)
    split = _rgb(load_split(None, p["size"], p["train"]))
    blob = json.dumps([norm, list(widths), p, split.data_hash], sort_keys=True)
    path = _cache_dir() / f"{norm}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt"
    with _locked(path):
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            return saved["state"], float(saved["error"])
        config = RunConfig(
            norm=norm,
            batch_size=p["batch"],
            seed=0,
            epochs=p["epochs"],
            base_lr=p["lr"],
            image_size=p["size"],
            max_train=p["train"],
            widths=widths,
        )

        def build(c: RunConfig, s: Split, packs: int) -> nn.Module:
            return Classifier(Backbone(norm, 3, widths), s.num_classes)

        with torch.random.fork_rng(devices=[]):
            model, [(history, _)] = train_loop([config], split, build=build)
        state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
        error = history[-1].test_error
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state": state, "error": error, "protocol": protocol}, tmp)
        os.replace(tmp, path)
        return state, error


def staleness(backbone: nn.Module, batches: Iterable[Any]) -> list[float | None]:
    """Per BatchNorm of ``backbone`` in depth order: the doctor's staleness of its running
    statistics against the inputs it gets from ``batches`` (in eval mode; each batch is
    fed as :func:`normlab.feed.feed` does: a tensor, or a list of images for a detector)."""
    from ...doctor.staleness import ExampleMoments, stale_distance
    from ...feed import feed

    layers = [
        m
        for m in backbone.modules()
        if isinstance(getattr(m, "running_mean", None), torch.Tensor)
        and isinstance(getattr(m, "running_var", None), torch.Tensor)
    ]
    moments = [ExampleMoments(split=True) for _ in layers]
    hooks = [
        m.register_forward_pre_hook(lambda _, a, mo=mo: mo.update(a[0]))
        for m, mo in zip(layers, moments, strict=True)
    ]
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                feed(backbone, batch)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was)
    return [
        stale_distance(m, {"moments": mo, "running": (m.running_mean, m.running_var)})
        for m, mo in zip(layers, moments, strict=True)
    ]


class DetectionBuilder:
    """The model builder of detection runs: the lab's detector, pretrained and treated by
    ``RunConfig.pretrain`` and the run's norm (module docstring); picklable."""

    def __init__(self) -> None:
        self._notes: dict[str, dict[str, Any]] = {}

    def __call__(self, config: RunConfig, split: Any, packs: int = 1) -> nn.Module:
        from ...convert import freeze_bn

        treatment = config.norm
        if packs != 1:
            raise ValueError("the lab's detector trains one seed per model (pack=False)")
        if config.pretrain is None and treatment in FROZEN_TREATMENTS:
            raise ValueError(
                f"--norms {treatment} with --no-pretrain: {treatment} freezes the statistics "
                "of a pretrained backbone, and a backbone trained from scratch has none (its "
                "BN statistics would stay at their initial 0 and 1); drop --no-pretrain, or "
                "use bn, gn or another norm that trains its statistics"
            )
        model = build_detector(
            family(treatment),
            num_classes=split.num_classes,
            in_channels=split.in_channels,
            widths=config.widths,
        )
        sync_if_asked(model, treatment)
        if config.pretrain is None:
            return model
        if split.in_channels != 3:
            raise ValueError(
                f"the pretrained backbone takes RGB images, got {split.in_channels} channels"
            )
        state, error = pretrained_backbone(family(treatment), tuple(config.widths), config.pretrain)
        model.backbone.load_state_dict(state)
        note: dict[str, Any] = {"pretrain": config.pretrain, "pretrain_error": error}
        if treatment == "bn+recal":
            from ...recalibrate import recalibrate

            batches = list(split.x_train.split(32))
            recalibrate(model.backbone, batches, method="precise", progress=False)
        if treatment in FROZEN_TREATMENTS:
            note["staleness"] = staleness(model.backbone, split.x_train[:256].split(64))
            freeze_bn(model.backbone, stats_only=treatment == "bn_eval")
        self._notes[config.key()] = note
        return model

    def conversion(self, config: RunConfig) -> dict[str, Any] | None:
        """What the builder did for ``config``'s run (kept in its record)."""
        return self._notes.get(config.key())

    def check(self, planned: list[RunConfig], split: Any) -> None:
        """Build each planned norm once (pretraining each family now): a refusal comes
        before anything is stored."""
        for norm in dict.fromkeys(c.norm for c in planned):
            with torch.random.fork_rng(devices=[]):
                self(next(c for c in planned if c.norm == norm), split)
