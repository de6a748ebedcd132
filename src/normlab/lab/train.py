"""One training run of the lab: config in, :class:`RunRecord` out.

Protocol (the same for every norm and batch size, after the Group Normalization paper):
SGD with momentum 0.9 and weight decay 5e-4; learning rate ``base_lr · batch / 32``
(linear scaling); linear warm-up over the first ``warmup_epochs`` epochs, then cosine
decay to zero, stepped per iteration; the same number of epochs at every batch size;
the last incomplete batch of an epoch is dropped (a batch of 1 would break BN). The test
error is measured in eval mode, so BN uses its running statistics. ``bn+recal`` trains
as BN and recomputes the running statistics over the training set
(:func:`normlab.recalibrate.recalibrate`) before every evaluation.

Data-parallel runs (``ranks`` > 1, inside an initialized :mod:`torch.distributed` group of
that size, e.g. under ``torchrun``): ``batch_size`` is the *per-rank* batch. Every rank
draws the same shuffled order, takes its own slice of each global batch of
``ranks · batch_size`` images, and the gradients are averaged by
``DistributedDataParallel``, so the optimizer sees the global batch: the learning rate
scales with the global batch and an epoch has ``n // (ranks · batch_size)`` steps. A
plain norm (``bn``) normalizes with per-rank statistics, a ``+sync`` one (``bn+sync``)
with global-batch statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split, load_split
from .defaults import DEFAULT_BASE_LR, DEFAULT_EPOCHS, DEFAULT_IMAGE_SIZE, DEFAULT_MAX_TRAIN
from .models import build_model, final_spatial_size, resolve_norm
from .packed import pack_states

__all__ = [
    "EpochStats",
    "RunConfig",
    "RunRecord",
    "train_model",
    "train_packed",
    "train_run",
    "train_runs",
    "versions",
]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run; its :meth:`key` identifies it in the store."""

    norm: str
    batch_size: int
    seed: int
    # The numbers of the defaults, and why, are in defaults.py.
    epochs: int = DEFAULT_EPOCHS
    base_lr: float = DEFAULT_BASE_LR
    warmup_epochs: float = 0.5
    weight_decay: float = 5e-4
    data: str | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    max_train: int | None = DEFAULT_MAX_TRAIN
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: int = 1
    #: Stride of the stem conv: 2 halves 16×16 inputs before the first stage, so four
    #: stages end at 1×1 (8, 4, 2, 1).
    stem_stride: int = 2
    ranks: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        resolve_norm(self.norm)
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        if self.batch_size < 2:
            raise ValueError(
                f"batch_size must be >= 2, got {self.batch_size}: batch statistics need at "
                "least two samples"
            )
        if self.stem_stride < 1:
            raise ValueError(f"stem_stride must be >= 1, got {self.stem_stride}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.base_lr <= 0:
            raise ValueError(f"base_lr must be > 0, got {self.base_lr}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("stem_stride", 1)  # stored before the field existed: a stride-1 stem
        if "widths" in kw:
            kw["widths"] = tuple(kw["widths"])
        return cls(**kw)

    def key(self) -> str:
        """Stable identity of the run: a hash of every field except the device.

        The device does not change what is measured, so a sweep started on CPU resumes
        on GPU without repeating finished runs.
        """
        d = self.to_dict()
        d.pop("device")
        # Fields added later drop out at the value runs had before they existed, so
        # stores written then still resume.
        if d["ranks"] == 1:
            d.pop("ranks")
        if d["stem_stride"] == 1:
            d.pop("stem_stride")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_error: float
    test_error: float
    lr: float


@dataclass
class RunRecord:
    """The outcome of one run: config, per-epoch curves, final test error (%), provenance."""

    config: RunConfig
    epochs: list[EpochStats]
    final_error: float
    wall_time: float
    diverged: bool
    num_train: int
    num_test: int
    final_map: int
    versions: dict[str, str] = field(default_factory=dict)
    #: Seeds trained side by side in one packed model with this run (1: alone); a packed
    #: run's ``wall_time`` is its equal share of the job's wall time.
    packed: int = 1

    @property
    def key(self) -> str:
        return self.config.key()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        d = dict(d)
        d["config"] = RunConfig.from_dict(d["config"])
        d["epochs"] = [EpochStats(**e) for e in d["epochs"]]
        return cls(**d)


def versions() -> dict[str, str]:
    """Provenance of a run: library versions, Python, platform."""
    from .. import __version__

    return {
        "normlab": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def _error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    model.eval()
    wrong = 0
    for i in range(0, len(x), 500):
        logits = model(x[i : i + 500].to(device))
        wrong += int((logits.argmax(1).cpu() != y[i : i + 500]).sum())
    return 100.0 * wrong / len(x)


@torch.no_grad()
def _errors_packed(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, packs: int
) -> list[float]:
    """Test error (%) of each of the ``packs`` networks of a packed model, same images."""
    model.eval()
    wrong = torch.zeros(packs, dtype=torch.int64)
    for i in range(0, len(x), 500):
        logits = model(x[i : i + 500].to(device).repeat(1, packs, 1, 1))  # (S, B, K)
        wrong += (logits.argmax(-1).cpu() != y[i : i + 500]).sum(1)
    return [100.0 * int(w) / len(x) for w in wrong]


def _recalibrate(
    model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: str, packs: int = 1
) -> None:
    try:
        from ..recalibrate import recalibrate
    except ImportError as e:
        raise RuntimeError(
            "norm 'bn+recal' needs normlab.recalibrate.recalibrate, which this installation "
            "lacks; update normlab or drop 'bn+recal' from --norms"
        ) from e
    batches = [
        x[i : i + batch_size].to(device).repeat(1, packs, 1, 1)
        for i in range(0, len(x) - batch_size + 1, batch_size)
    ]
    # Precise BN: the statistics of the train-mode inputs the network was trained on.
    recalibrate(model, batches, method="precise", progress=False)


def _build(config: RunConfig, split: Split, packs: int = 1) -> torch.nn.Module:
    """The lab ResNet of ``config`` for ``split``'s images and classes (on CPU)."""
    return build_model(
        config.norm,
        in_channels=split.in_channels,
        num_classes=split.num_classes,
        widths=config.widths,
        blocks=config.blocks,
        packs=packs,
        stem_stride=config.stem_stride,
    )


def _is_recal(config: RunConfig) -> bool:
    return config.norm.lower().replace("-", "_") == "bn+recal"


def _optimizer(model: torch.nn.Module, peak: float, weight_decay: float) -> torch.optim.SGD:
    """SGD, momentum 0.9, weight decay on conv/linear weights only (not norms, biases)."""
    params_decay = [p for p in model.parameters() if p.ndim > 1]
    params_plain = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [
            {"params": params_decay, "weight_decay": weight_decay},
            {"params": params_plain, "weight_decay": 0.0},
        ],
        lr=peak,
        momentum=0.9,
        foreach=True,  # one multi-tensor update instead of ~4 small ops per parameter
    )


def _check_world(config: RunConfig) -> int:
    """This process's rank for a data-parallel run; a clear error if the group is wrong."""
    import torch.distributed as dist

    if config.ranks == 1:
        return 0
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"run {config.norm} at batch {config.batch_size} is data-parallel over "
            f"{config.ranks} ranks but torch.distributed is not initialized; launch with "
            f"`torchrun --nproc-per-node {config.ranks} -m normlab sweep --per-rank-batch ...`"
        )
    if dist.get_world_size() != config.ranks:
        raise RuntimeError(
            f"run {config.norm} at batch {config.batch_size} was planned for {config.ranks} "
            f"ranks but the process group has {dist.get_world_size()}; rerun with "
            f"--nproc-per-node {config.ranks}"
        )
    return dist.get_rank()


def train_model(
    config: RunConfig,
    split: Split,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> tuple[torch.nn.Module, list[EpochStats], bool]:
    """Train one model by the protocol; returns ``(model, per-epoch stats, diverged)``.

    For ``config.ranks > 1`` every rank of the initialized process group calls this with
    the same config and data; the returned model is this rank's replica (unwrapped).
    """
    rank = _check_world(config)
    n = len(split.x_train)
    global_batch = config.batch_size * config.ranks
    if n < global_batch:
        raise ValueError(
            f"batch_size {config.batch_size} × {config.ranks} rank(s) exceeds the {n} training "
            "images; use a smaller batch or more data"
        )
    device = config.device
    torch.manual_seed(config.seed)
    model = _build(config, split).to(device)
    net: torch.nn.Module = model
    if config.ranks > 1:
        # Same seed on every rank: identical initial weights; DDP also broadcasts rank
        # 0's, and (its default) rank 0's buffers before each forward, so plain BN's
        # running statistics are rank 0's per-rank estimates, as in usual DDP training.
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
        )
    recal = _is_recal(config)
    peak = config.base_lr * global_batch / 32
    opt = _optimizer(model, peak, config.weight_decay)
    steps_per_epoch = n // global_batch
    total = steps_per_epoch * config.epochs
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(config.seed)
    x_train, y_train = split.x_train, split.y_train
    lo, hi = rank * config.batch_size, (rank + 1) * config.batch_size
    history: list[EpochStats] = []
    diverged = False
    step = 0
    lr = peak
    for epoch in range(config.epochs):
        net.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, wrong = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * global_batch : (b + 1) * global_batch][lo:hi]
            xb, yb = x_train[idx].to(device), y_train[idx].to(device)
            lr = _lr_at(step, total, warmup, peak)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                diverged = True
                if config.ranks == 1:
                    break
                # Data-parallel: the other ranks are about to all-reduce gradients, so
                # finish the epoch with them; _reduce_epoch stops every rank together.
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            wrong += int((logits.detach().argmax(1) != yb).sum())
        loss_sum, wrong, diverged = _reduce_epoch(config, loss_sum, wrong, diverged)
        seen = max(1, steps_per_epoch * global_batch)
        if recal and not diverged:
            _recalibrate(model, x_train, config.batch_size, device)
        last = diverged or epoch == config.epochs - 1
        # Intermediate epochs: a fixed 500-image slice of the test set (a curve, cheaply);
        # the final error: the whole test set.
        n_eval = len(split.x_test) if last else min(len(split.x_test), 500)
        stats = EpochStats(
            epoch=epoch + 1,
            train_loss=loss_sum / seen if not diverged else float("nan"),
            train_error=100.0 * wrong / seen,
            test_error=_error(model, split.x_test[:n_eval], split.y_test[:n_eval], device),
            lr=lr,
        )
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if diverged:
            break
    return model, history, diverged


def _reduce_epoch(
    config: RunConfig, loss_sum: float, wrong: int, diverged: bool
) -> tuple[float, int, bool]:
    """Sum an epoch's loss and mistakes over ranks; one diverged rank stops them all."""
    if config.ranks == 1:
        return loss_sum, wrong, diverged
    import torch.distributed as dist

    t = torch.tensor([loss_sum, float(wrong), float(diverged)], dtype=torch.float64)
    if config.device.startswith("cuda"):
        t = t.to(config.device)
    dist.all_reduce(t)
    return float(t[0]), int(t[1]), bool(t[2] > 0)


def train_run(
    config: RunConfig,
    *,
    split: Split | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> RunRecord:
    """Train and evaluate one model; ``on_epoch`` is called after every epoch."""
    start = time.perf_counter()
    if split is None:
        split = load_split(config.data, config.image_size, config.max_train)
    _, history, diverged = train_model(config, split, on_epoch)
    return RunRecord(
        config=config,
        epochs=history,
        final_error=history[-1].test_error,
        wall_time=time.perf_counter() - start,
        diverged=diverged,
        num_train=len(split.x_train),
        num_test=len(split.x_test),
        final_map=final_spatial_size(config.image_size, len(config.widths), config.stem_stride),
        versions=versions(),
    )


# -- seeds side by side (normlab.lab.packed) ------------------------------------------------


def _check_packable(configs: Sequence[RunConfig]) -> None:
    if not configs:
        raise ValueError("no runs to train")
    base = {**configs[0].to_dict(), "seed": None}
    for c in configs[1:]:
        if {**c.to_dict(), "seed": None} != base:
            raise ValueError(f"runs packed together must differ only in seed: {configs[0]} vs {c}")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"packed runs need distinct seeds, got {seeds}")
    if configs[0].ranks != 1:
        raise ValueError("data-parallel runs (ranks > 1) are trained one at a time, not packed")


def train_packed(
    configs: Sequence[RunConfig],
    split: Split,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> tuple[torch.nn.Module, list[tuple[list[EpochStats], bool]]]:
    """Train runs that differ only in seed side by side in one packed model.

    Seed s's network starts from the weights ``train_model`` would build for it
    (``torch.manual_seed(seed)``), draws its own data order, and gets exactly its own
    gradient and update (see :mod:`normlab.lab.packed`), so each run follows the protocol
    of :func:`train_model`; only float rounding differs. A run whose loss turns
    non-finite is evaluated at once and stops being recorded, as an unpacked run stops;
    the others go on.

    Returns:
        ``(packed model, per run in order (per-epoch stats, diverged))``;
        :func:`normlab.lab.packed.unpack_state` cuts one run's weights out of the model.
        ``on_epoch(i, stats)`` is called after each epoch of run ``i``.
    """
    _check_packable(configs)
    base, packs = configs[0], len(configs)
    n = len(split.x_train)
    if n < base.batch_size:
        raise ValueError(
            f"batch_size {base.batch_size} exceeds the {n} training images; use a smaller "
            "batch or more data"
        )
    device = base.device
    plains = []
    for c in configs:
        torch.manual_seed(c.seed)  # the init an unpacked run of this seed would get
        plains.append(_build(c, split))
    model = _build(base, split, packs)
    pack_states(model, plains)
    model.to(device)
    del plains
    bs = base.batch_size
    peak = base.base_lr * bs / 32
    opt = _optimizer(model, peak, base.weight_decay)
    steps_per_epoch = n // bs
    total = steps_per_epoch * base.epochs
    warmup = min(total, round(base.warmup_epochs * steps_per_epoch))
    gens = [torch.Generator().manual_seed(c.seed) for c in configs]
    x_train, y_train = split.x_train, split.y_train
    _, c_in, h, w = x_train.shape
    histories: list[list[EpochStats]] = [[] for _ in configs]
    diverged = [False] * packs
    alive = torch.ones(packs, dtype=torch.bool)
    seen = max(1, steps_per_epoch * bs)
    step = 0
    lr = peak

    def record(i: int, stats: EpochStats) -> None:
        histories[i].append(stats)
        if on_epoch is not None:
            on_epoch(i, stats)

    for epoch in range(base.epochs):
        model.train()
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (S, n)
        loss_sum = torch.zeros(packs, dtype=torch.float64)
        wrong = torch.zeros(packs, dtype=torch.int64)
        for b in range(steps_per_epoch):
            idx = orders[:, b * bs : (b + 1) * bs]  # (S, B)
            # (S, B, C, H, W) -> (B, S·C, H, W): seed s's images in its own channels.
            xb = x_train[idx].transpose(0, 1).reshape(bs, packs * c_in, h, w).to(device)
            yb = y_train[idx].to(device)
            lr = _lr_at(step, total, warmup, peak)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = model(xb)  # (S, B, K)
            losses = (
                F.cross_entropy(logits.reshape(packs * bs, -1), yb.reshape(-1), reduction="none")
                .view(packs, bs)
                .mean(1)
            )
            finite = torch.isfinite(losses.detach()).cpu()
            if not bool(finite[alive].all()):
                newly = (alive & ~finite).nonzero().flatten().tolist()
                errs = _errors_packed(model, split.x_test, split.y_test, device, packs)
                for i in newly:
                    diverged[i] = True
                    record(
                        i,
                        EpochStats(
                            epoch + 1, float("nan"), 100.0 * int(wrong[i]) / seen, errs[i], lr
                        ),
                    )
                alive &= finite
                model.train()
                if not bool(alive.any()):
                    break
            # Each network's gradient is that of its own loss: no operator mixes seeds.
            loss = losses.sum() if bool(alive.all()) else losses[alive.to(losses.device)].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += losses.detach().cpu().double() * bs
            wrong += (logits.detach().argmax(-1) != yb).sum(1).cpu()
        if not bool(alive.any()):
            break
        if _is_recal(base):
            _recalibrate(model, x_train, bs, device, packs)
        last = epoch == base.epochs - 1
        n_eval = len(split.x_test) if last else min(len(split.x_test), 500)
        errs = _errors_packed(model, split.x_test[:n_eval], split.y_test[:n_eval], device, packs)
        for i in alive.nonzero().flatten().tolist():
            record(
                i,
                EpochStats(
                    epoch + 1, float(loss_sum[i]) / seen, 100.0 * int(wrong[i]) / seen, errs[i], lr
                ),
            )
    return model, [(histories[i], diverged[i]) for i in range(packs)]


def train_runs(
    configs: Sequence[RunConfig],
    *,
    split: Split | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
    pack: bool = True,
) -> list[RunRecord]:
    """Train runs that differ only in seed; packed side by side unless ``pack=False``.

    ``on_epoch(i, stats)`` is called after each epoch of run ``i``.
    """
    _check_packable(configs)
    if not pack or len(configs) == 1:
        return [
            train_run(c, split=split, on_epoch=None if on_epoch is None else partial(on_epoch, i))
            for i, c in enumerate(configs)
        ]
    start = time.perf_counter()
    base = configs[0]
    if split is None:
        split = load_split(base.data, base.image_size, base.max_train)
    _, results = train_packed(configs, split, on_epoch)
    share = (time.perf_counter() - start) / len(configs)
    return [
        RunRecord(
            config=c,
            epochs=history,
            final_error=history[-1].test_error,
            wall_time=share,
            diverged=diverged,
            num_train=len(split.x_train),
            num_test=len(split.x_test),
            final_map=final_spatial_size(c.image_size, len(c.widths), c.stem_stride),
            versions=versions(),
            packed=len(configs),
        )
        for c, (history, diverged) in zip(configs, results, strict=True)
    ]
