"""The lab's one training loop: S runs that differ only in seed, side by side.

S = 1 is a lone run, trained alone or data-parallel over ``ranks`` processes; S > 1 packs
the seeds into one model (:mod:`normlab.lab.run.packed`). The protocol is described in
:mod:`normlab.lab.run.train`. Two extension points keep the loop general:

* the *task* (:class:`normlab.lab.tasks.task.Task`) gives the loss and the error metrics from
  the model's output and the targets; :data:`~normlab.lab.tasks.task.CLASSIFICATION` is the
  default;
* the *model builder* (:data:`ModelBuilder`) makes a run's network from its config and
  data; :func:`lab_model`, the lab's ResNet, is the default.

The two defaults stand for the run's own task (``RunConfig.task``): a segmentation or
detection run given them trains that task and its default model instead
(:func:`normlab.lab.tasks.registry.task_defaults`).

Training length: ``RunConfig.steps`` optimizer steps, or ``epochs`` passes of
``n // (ranks · batch_size)`` steps each (the last incomplete batch of a pass is dropped).
Either way the data order reshuffles at every pass and the run is evaluated at
``epochs`` points, after steps ``⌊k · total / epochs⌋`` (k = 1 … epochs), which for fixed
epochs are the ends of the epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models.resnet import build_model, recal_variance
from ..tasks.registry import task_defaults
from ..tasks.task import CLASSIFICATION, Task, merge_tallies, run_model, tally_over_ranks
from .config import EpochStats, RunConfig
from .packed import pack_states

if TYPE_CHECKING:
    from ..data.images import Split

__all__ = ["ModelBuilder", "build_networks", "check_packable", "lab_model", "train_loop"]

#: ``build(config, split, packs) -> model`` on CPU, with fresh weights drawn from torch's
#: global generator (the loop seeds it with ``config.seed`` first). ``packs == 1``: one
#: network, input (B, C, H, W) -> output (B, ...). ``packs`` = S > 1: S networks side by
#: side, input (B, S·C, H, W) holding each network's own images -> output (S, B, ...),
#: whose ``state_dict`` :func:`normlab.lab.run.packed.pack_states` fills from S one-network
#: models; a builder that cannot pack raises ``ValueError`` for ``packs > 1``.
ModelBuilder = Callable[[RunConfig, "Split", int], nn.Module]

#: Test images per evaluation forward.
_EVAL_CHUNK = 500
#: Test images behind an intermediate evaluation point (the last one uses the whole set).
_CURVE_IMAGES = 500


def lab_model(config: RunConfig, split: Split, packs: int = 1) -> nn.Module:
    """The default :data:`ModelBuilder`: the lab ResNet of ``config`` for ``split``."""
    return build_model(
        config.norm,
        in_channels=split.in_channels,
        num_classes=split.num_classes,
        widths=config.widths,
        blocks=config.blocks,
        packs=packs,
        stem_stride=config.stem_stride,
    )


def build_networks(
    configs: Sequence[RunConfig], split: Split, build: ModelBuilder = lab_model
) -> nn.Module:
    """The initial model of runs that differ only in seed (on CPU).

    Each run's network gets the weights a lone run of its seed starts from
    (``torch.manual_seed(seed)``, then ``build(config, split, 1)``); several runs are then
    packed into one ``build(configs[0], split, len(configs))`` model.
    """
    plains = []
    for c in configs:
        torch.manual_seed(c.seed)
        plains.append(build(c, split, 1))
    if len(plains) == 1:
        return plains[0]
    model = build(configs[0], split, len(configs))
    pack_states(model, plains)
    return model


def check_packable(configs: Sequence[RunConfig]) -> None:
    """Refuse runs that cannot train together: no runs, fields other than the seed that
    differ, repeated seeds, or several data-parallel runs."""
    if not configs:
        raise ValueError("no runs to train")
    base = {**configs[0].to_dict(), "seed": None}
    for c in configs[1:]:
        if {**c.to_dict(), "seed": None} != base:
            raise ValueError(f"runs packed together must differ only in seed: {configs[0]} vs {c}")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"packed runs need distinct seeds, got {seeds}")
    if configs[0].ranks != 1 and len(configs) > 1:
        raise ValueError("data-parallel runs (ranks > 1) are trained one at a time, not packed")


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def _optimizer(model: nn.Module, peak: float, weight_decay: float) -> torch.optim.SGD:
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


def _batches(
    configs: Sequence[RunConfig], n: int, global_batch: int, rank: int
) -> Iterator[torch.Tensor]:
    """Sample indices (S, B) of this rank's share of each step's global batch, endlessly.

    Each pass every network draws a fresh permutation from its own seeded generator and
    takes ``n // global_batch`` global batches of it; rank r takes the r-th slice of
    ``batch_size`` of each.
    """
    gens = [torch.Generator().manual_seed(c.seed) for c in configs]
    lo, hi = rank * configs[0].batch_size, (rank + 1) * configs[0].batch_size
    while True:
        orders = torch.stack([torch.randperm(n, generator=g) for g in gens])  # (S, n)
        for b in range(n // global_batch):
            yield orders[:, b * global_batch : (b + 1) * global_batch][:, lo:hi]


def _inputs(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Images of indices (S, B) as one batch: (B, S·C, H, W), network s's in its channels."""
    if idx.shape[0] == 1:
        return x[idx[0]]
    packs, batch = idx.shape
    return x[idx].transpose(0, 1).reshape(batch, packs * x.shape[1], *x.shape[2:])


@torch.no_grad()
def _test_errors(
    model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, device: str, packs: int
) -> list[dict[str, float]]:
    """Each network's metrics (:meth:`Task.errors`) on the same test images, in eval mode."""
    model.eval()
    tally = None
    for i in range(0, len(x), _EVAL_CHUNK):
        xb, yb = x[i : i + _EVAL_CHUNK].to(device), y[i : i + _EVAL_CHUNK].to(device)
        yb = yb.expand(packs, *yb.shape)
        out = run_model(task, model, xb if packs == 1 else xb.repeat(1, packs, 1, 1), yb, packs)
        tally = merge_tallies(task, tally, task.tally(out, yb).cpu())
    if tally is None:
        return [dict.fromkeys(task.metrics, 0.0) for _ in range(packs)]
    return task.errors(tally)


def _point(
    task: Task,
    epoch: int,
    loss: float,
    train_error: float,
    test: dict[str, float],
    lr: float,
    step: int,
) -> EpochStats:
    """An evaluation point; a task with several metrics keeps them all in ``test_metrics``."""
    extra = dict(test) if len(task.metrics) > 1 else {}
    return EpochStats(epoch, loss, train_error, test[task.metrics[0]], lr, step, extra)


def _for_task(
    config: RunConfig, split: Split, task: Task, build: ModelBuilder
) -> tuple[Task, ModelBuilder]:
    """The task and builder of ``config``'s runs: the defaults (:data:`CLASSIFICATION`,
    :func:`lab_model`) stand for the run's own task and its default model."""
    own = task_defaults(config, split)
    if own is None:
        return task, build
    own_task, own_build = own
    return (own_task if task is CLASSIFICATION else task), (
        own_build if build is lab_model else build
    )


def _headline(task: Task, tally: torch.Tensor | None, packs: int) -> list[float]:
    """Each network's headline error (the task's first metric); 0 for an empty tally."""
    if tally is None:
        return [0.0] * packs
    return [e[task.metrics[0]] for e in task.errors(tally)]


def _recalibrate(
    model: nn.Module, x: torch.Tensor, config: RunConfig, packs: int, variance: str
) -> None:
    """Precise BN: the running statistics of the train-mode inputs the net was trained on."""
    try:
        from ...recalibrate import recalibrate
    except ImportError as e:
        raise RuntimeError(
            f"norm {config.norm!r} needs normlab.recalibrate.recalibrate, which this "
            f"installation lacks; update normlab or drop {config.norm!r} from --norms"
        ) from e
    bs = config.batch_size
    batches = [
        x[i : i + bs].to(config.device).repeat(1, packs, 1, 1)
        for i in range(0, len(x) - bs + 1, bs)
    ]
    recalibrate(model, batches, method="precise", variance=variance, progress=False)


def _all_reduce(config: RunConfig, values: torch.Tensor) -> torch.Tensor:
    """Sum float64 ``values`` over the ranks of a data-parallel run."""
    if config.ranks == 1:
        return values
    import torch.distributed as dist

    t = values.to(config.device) if config.device.startswith("cuda") else values.clone()
    dist.all_reduce(t)
    return t.cpu()


def train_loop(
    configs: Sequence[RunConfig],
    split: Split,
    *,
    task: Task = CLASSIFICATION,
    build: ModelBuilder = lab_model,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
) -> tuple[nn.Module, list[tuple[list[EpochStats], bool]]]:
    """Train runs that differ only in seed side by side (one run: alone or data-parallel).

    ``configs`` must share every field but the seed (:func:`check_packable`);
    data-parallel runs (``ranks`` > 1) come one at a time.
    A network whose loss turns non-finite is evaluated on the whole test set at once and
    stops being recorded (a data-parallel run finishes the evaluation period with the
    other ranks first); the others go on.

    Returns:
        ``(model, per run in order (stats per evaluation point, diverged))``; the model
        is unwrapped (this rank's replica for a data-parallel run).
        ``on_epoch(i, stats)`` is called after each evaluation point of run ``i``.
    """
    check_packable(configs)
    base, packs = configs[0], len(configs)
    task, build = _for_task(base, split, task, build)
    rank = _check_world(base)
    n, bs = len(split.x_train), base.batch_size
    global_batch = bs * base.ranks
    if n < global_batch:
        ranks = f" × {base.ranks} ranks" if base.ranks > 1 else ""
        raise ValueError(
            f"batch_size {bs}{ranks} exceeds the {n} training images; use a smaller batch "
            "or more data"
        )
    device = base.device
    model = build_networks(configs, split, build).to(device)
    net: nn.Module = model
    if base.ranks > 1:
        # Same seed on every rank: identical initial weights; DDP also broadcasts rank
        # 0's, and (its default) rank 0's buffers before each forward, so plain BN's
        # running statistics are rank 0's per-rank estimates, as in usual DDP training.
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
        )
    # A task may say which norms the loop recalibrates (detection: none; it does so once).
    variance = getattr(task, "recal_variance", recal_variance)(base.norm)
    peak = base.base_lr * global_batch / 32
    opt = _optimizer(model, peak, base.weight_decay)
    per_pass = n // global_batch
    total = per_pass * base.epochs if base.steps is None else base.steps
    # Warm-up: warmup_epochs epochs, or the same fraction of a fixed number of steps.
    period = per_pass if base.steps is None else base.steps / base.epochs
    warmup = min(total, round(base.warmup_epochs * period))
    batches = _batches(configs, n, global_batch, rank)
    x_train, y_train = split.x_train, split.y_train
    histories: list[list[EpochStats]] = [[] for _ in configs]
    diverged = [False] * packs
    alive = torch.ones(packs, dtype=torch.bool)
    step = 0
    lr = peak

    def record(i: int, stats: EpochStats) -> None:
        histories[i].append(stats)
        if on_epoch is not None:
            on_epoch(i, stats)

    for point in range(base.epochs):
        net.train()
        end = (point + 1) * total // base.epochs
        seen = (end - step) * global_batch
        loss_sum = torch.zeros(packs, dtype=torch.float64)
        tally: torch.Tensor | None = None  # the task's counts over the period's steps
        late_nan = False  # data-parallel: a non-finite loss, reported at the period's end
        while step < end:
            idx = next(batches)
            xb, yb = _inputs(x_train, idx).to(device), y_train[idx].to(device)
            lr = _lr_at(step, total, warmup, peak)
            for g in opt.param_groups:
                g["lr"] = lr
            out = run_model(task, net, xb, yb, packs)
            losses = task.loss(out, yb)
            finite = torch.isfinite(losses.detach()).cpu()
            if not bool(finite[alive].all()):
                if base.ranks > 1:
                    # The other ranks are about to all-reduce gradients: finish the
                    # period with them; the reduction below stops every rank together.
                    late_nan = True
                else:
                    newly = (alive & ~finite).nonzero().flatten().tolist()
                    errs = _test_errors(model, task, split.x_test, split.y_test, device, packs)
                    train_errs = _headline(task, tally, packs)
                    for i in newly:
                        diverged[i] = True
                        record(
                            i, _point(task, point + 1, math.nan, train_errs[i], errs[i], lr, step)
                        )
                    alive &= finite
                    net.train()
                    if not bool(alive.any()):
                        break
            # Each network's gradient is that of its own loss: no operator mixes seeds.
            loss = losses.sum() if bool(alive.all()) else losses[alive.to(losses.device)].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += losses.detach().cpu().double() * bs
            tally = merge_tallies(task, tally, task.tally(out.detach(), yb).cpu())
        if not bool(alive.any()):
            break
        if base.ranks > 1 and tally is not None:
            # Sum the period's loss over the ranks and merge their tallies
            # (:func:`tally_over_ranks`); one diverged rank stops all.
            flag = torch.tensor([float(late_nan)], dtype=torch.float64)
            flat = _all_reduce(base, torch.cat([loss_sum, flag]))
            loss_sum, late_nan = flat[:packs], bool(flat[-1] > 0)
            tally = tally_over_ranks(task, tally, base.device)
        last = late_nan or point == base.epochs - 1
        if variance is not None and not late_nan:
            _recalibrate(model, x_train, base, packs, variance)
        # Intermediate points: a fixed slice of the test set (a curve, cheaply); the final
        # error: the whole test set.
        n_eval = len(split.x_test) if last else min(len(split.x_test), _CURVE_IMAGES)
        errs = _test_errors(
            model, task, split.x_test[:n_eval], split.y_test[:n_eval], device, packs
        )
        train_errs = _headline(task, tally, packs)
        for i in alive.nonzero().flatten().tolist():
            train_loss = math.nan if late_nan else float(loss_sum[i]) / seen
            record(i, _point(task, point + 1, train_loss, train_errs[i], errs[i], lr, step))
        if late_nan:
            diverged[0] = True
            break
    return model, [(histories[i], diverged[i]) for i in range(packs)]
