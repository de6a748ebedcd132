"""The doctor's finding codes: what each means, why it matters, and the fix.

Every :class:`Finding` carries one of the codes of :data:`CODES`; the
explanation and the fix are shared by every module reported with that code, so
the report can print them once per code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CODES", "Finding", "Severity", "SEVERITY_ORDER", "finding"]

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}

_RECALIBRATE = "normlab.recalibrate.recalibrate(model, batches)"

#: code -> (why it matters, for every layer reported; the fix)
CODES: dict[str, tuple[str, str]] = {
    "bn_training_mode": (
        "BN layers in training mode while the model is evaluated normalize each batch with "
        "its own statistics (outputs depend on the other samples; batch 1 fails) and "
        "overwrite their running statistics.",
        "Call model.eval() before evaluating (and do not call .train() on submodules "
        "afterwards); to keep BN in eval mode during training use "
        "normlab.convert.freeze_bn(model) (stats_only=True keeps γ and β trainable).",
    ),
    "batch_stats_in_eval": (
        "With track_running_stats=False, BN normalizes with the statistics of the evaluation "
        "batch even in eval mode: predictions depend on what else is in the batch.",
        f"Create the layer with track_running_stats=True and compute its statistics with "
        f"{_RECALIBRATE}; or use a batch-independent norm (convert_norms(model, 'gn')).",
    ),
    "tiny_batch_statistic": (
        "In training, each batch statistic rests on N × H × W values. With 2 values every "
        "normalized output is exactly ±1 (only the sign of the difference survives), with 1 "
        "torch refuses to train; below 8 the statistics are so noisy that training suffers "
        "and the running statistics used in eval describe something training never saw.",
        "Use a larger batch or keep a larger feature map before these layers; or replace BN "
        "by a batch-independent norm (convert_norms(model, 'gn'), FRN, EvoNorm-S0); or "
        "freeze it (normlab.convert.freeze_bn) when fine-tuning from good statistics.",
    ),
    "degenerate_statistic": (
        "GroupNorm / InstanceNorm normalizing groups of a single value: x − mean is 0, so the "
        "output is β whatever the input, and no gradient flows through.",
        "Use fewer groups (GroupNorm) or a norm over more dims here (LayerNorm, BN), or keep "
        "a larger spatial map before these layers.",
    ),
    "tiny_instance_statistic": (
        "Per-sample norms (GroupNorm, InstanceNorm, FRN, EvoNorm-S0) computing each statistic "
        "from a handful of values keep little more than the sign pattern of their input: FRN "
        "on a 1×1 map computes γ·x/sqrt(x² + ε) + β, about γ·sign(x) + β; a GroupNorm group "
        "of 2 values outputs ±1.",
        "Normalize over more values here: fewer groups, a norm over the channels (LayerNorm), "
        "FRN with learnable_eps=True (the FRN paper's remedy for 1×1 maps), or no norm on "
        "the smallest maps.",
    ),
    "running_stats_nonfinite": (
        "NaN or inf in running_mean / running_var: every eval output of these channels is NaN.",
        "Find the step that diverged (lower the learning rate, check the data for NaN/inf), "
        f"then recompute the statistics with {_RECALIBRATE}.",
    ),
    "nonfinite_batches_skipped": (
        "Training batches with inf/NaN statistics reached this layer; it kept its previous "
        "running statistics (torch's BN would have written the NaN into them), but those "
        "batches' outputs and gradients were NaN/inf and something upstream produces them.",
        "Find the source: an AMP overflow (bf16 autocast or torch.amp.GradScaler; restore "
        "the statistics of skipped steps with normlab.guard.snapshot_running_stats), a bad "
        "sample in the data, a diverging step (lower the learning rate).",
    ),
    "running_var_negative": (
        "A negative running_var is impossible for a variance: the stored statistics are "
        "corrupt (an edited or damaged checkpoint, a bad conversion). torch's eval BN gives "
        "NaN in these channels; normlab's layers refuse the forward on CPU and give NaN there "
        "on a GPU or under torch.compile.",
        "Reload the checkpoint from a good copy, or recompute the statistics on "
        f"representative data with {_RECALIBRATE}.",
    ),
    "running_var_near_zero": (
        "running_var below eps/100 in some channels while the example input varies there: "
        "eval divides by about sqrt(eps) and amplifies any input change in those channels.",
        "If these channels are dead in training data too, ignore this; otherwise recompute "
        f"the statistics on representative data with {_RECALIBRATE}.",
    ),
    "uncalibrated_running_stats": (
        "Running statistics still at their initial values (mean 0, variance 1, no batch "
        "tracked): eval normalizes with made-up statistics, not those of the data.",
        f"Load trained weights, train the model, or compute the statistics with {_RECALIBRATE}.",
    ),
    "stale_running_stats": (
        "The running statistics do not describe the example batch: in eval the output differs "
        "from what the layer's own batch statistics give by more than half a standard "
        "deviation (median over channels).",
        f"Recompute them on training data with {_RECALIBRATE}, e.g. after converting, fusing "
        "or changing the data; if the example batch is unrepresentative, ignore this.",
    ),
    "frozen_bn_changes": (
        "A frozen BN whose state changes: trainable parameters an optimizer will move, or "
        "buffers its forward updates.",
        "Use normlab.nn.FrozenBatchNorm*d (buffers only, never updated), e.g. via "
        "normlab.convert.freeze_bn(model).",
    ),
    "bn_params_frozen_stats_not": (
        "γ and β have requires_grad=False, but the layer trains in training mode: it still "
        "normalizes with batch statistics and updates its running statistics, so it is not "
        "frozen.",
        "Use normlab.convert.freeze_bn(model) (stays frozen after model.train(); "
        "stats_only=True fixes only the statistics), or call .eval() on these layers after "
        "every model.train().",
    ),
    "dropout_before_bn": (
        "Dropout output feeds a BN: in training it sees the variance of dropped-out "
        "activations, in eval the variance without dropout, so its running variance is wrong "
        "at test time ('variance shift', Li et al., CVPR 2019).",
        "Move dropout after the last BN (e.g. just before the classifier), or recalibrate the "
        f"statistics with dropout off (model.eval(), then {_RECALIBRATE}).",
    ),
    "momentum_extreme": (
        "momentum 0 never moves the running statistics from their initial values; momentum "
        "≥ 0.5 makes them mostly the last batch, as noisy as one batch estimate.",
        "Use momentum=0.1 (torch's default; smaller for tiny batches) or None for a "
        f"cumulative average, or {_RECALIBRATE} after training.",
    ),
    "bn_shared_across_calls": (
        "One batch-statistics layer runs several times in one forward (a head shared by the "
        "FPN levels): in training each call normalizes with its own level's statistics, but "
        "the running statistics average all levels, so eval normalizes every level with "
        "statistics none of them has.",
        "Give each call its own norm (one BN per level, as mmdetection's heads do; the shared "
        "convs stay shared), or use a batch-independent norm there: "
        "normlab.convert.convert_norms(model, 'gn', include='<the shared module>').",
    ),
    "groupnorm32_blocked": (
        "Channel counts not divisible by 32: GroupNorm(32) cannot replace these layers; "
        "convert_norms(model, 'gn') would use fewer groups there.",
        "Fine if intended; otherwise use multiples of 32 channels or choose the number of "
        "groups explicitly (convert_norms(model, 'gn', num_groups=...)).",
    ),
}


@dataclass(frozen=True)
class Finding:
    """One problem at one module.

    ``code`` is stable, ``severity`` is ``"error"``, ``"warning"`` or ``"info"``,
    ``module`` the dotted path (``""`` for the whole model). ``detail`` says what
    was seen at this module; ``message`` is ``detail`` followed by why it matters
    (the explanation shared by every module with this code); ``fix`` what to do.
    """

    code: str
    severity: Severity
    module: str
    message: str
    fix: str
    detail: str = ""


def finding(code: str, severity: Severity, module: str, detail: str) -> Finding:
    """A finding with the code's explanation and fix from :data:`CODES`."""
    why, fix = CODES[code]
    return Finding(code, severity, module, f"{detail} {why}", fix, detail)
