"""SwitchableNorm1d/2d/3d and a loader for checkpoints of the paper's code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as NF
from ..functional.switchable_norm import switchable_norm_components
from ._base import NormBase
from ._kernel_options import options_repr, take_backend

__all__ = [
    "SwitchableNorm1d",
    "SwitchableNorm2d",
    "SwitchableNorm3d",
    "load_reference_switchnorm_state_dict",
]


class _SwitchableNorm(NormBase):
    r"""Switchable normalization (Luo et al., 2018, arXiv 1806.10779).

    Learns, per layer, how much of instance, layer and batch normalization to use:

    .. math::
        y = \gamma\,\frac{x - \sum_k w_k \mu_k}{\sqrt{\sum_k w'_k \sigma^2_k + \epsilon}} + \beta,
        \qquad w = \mathrm{softmax}(\lambda),\; w' = \mathrm{softmax}(\lambda')

    k runs over IN (per sample and channel), LN (per sample) and BN (per channel);
    ``SwitchableNorm1d`` takes (N, C) input and mixes LN and BN only. The means
    and the variances have separate importance logits, ``mean_weight`` (λ) and
    ``var_weight`` (λ'), initialised to ones (a uniform mixture). The LN and BN
    variances are the exact variances of their groups (derived from one pass of
    per-(n, c) moments), so H·W = 1 works; see
    :func:`normlab.functional.switchable_norm`.

    * ``train()``: BN statistics from the batch; ``running_mean`` / ``running_var``
      are updated with the unbiased batch variance and **torch's momentum
      convention**, ``running = (1 − momentum)·running + momentum·batch``
      (``momentum=None``: cumulative average). The paper's code uses the reverse
      (its momentum 0.9 / 0.997 is our 0.1 / 0.003).
    * ``eval()``: BN statistics from the running averages, IN and LN per sample.
      With ``track_running_stats=False`` the batch statistics are used in eval too.

    Args:
        num_features: C.
        eps: added to the mixed variance, > 0.
        momentum: weight of the new batch statistic, or None (cumulative average).
        using_bn: include the BN statistics (3 logits, or 2 for 1d); without it no
            running statistics are kept.
        last_gamma: initialise γ to 0 (for the last norm of a residual branch).
        affine: learn γ (``weight``) and β (``bias``).
        track_running_stats: keep ``running_mean``, ``running_var``,
            ``num_batches_tracked`` for eval (ignored with ``using_bn=False``).
        process_group: in training, compute the BN branch's statistics over every
            process of this group: None (default) for no sync, ``"world"`` for the
            default group, or a ``torch.distributed.ProcessGroup``. A no-op on a
            single process; see :mod:`normlab.distributed`.
        backend: ``"auto"`` (the fused Triton kernels for CUDA input when triton
            imports and no ``process_group`` is active, torch otherwise), ``"torch"``
            or ``"triton"``; see :func:`normlab.functional.switchable_norm`.

    Shape:
        Input and output: (N, C) for 1d, (N, C, H, W) for 2d, (N, C, D, H, W) for 3d.

    Example::

        >>> sn = normlab.nn.SwitchableNorm2d(16)
        >>> y = sn(torch.randn(2, 16, 8, 8))
        >>> torch.softmax(sn.mean_weight, 0)  # the learned (IN, LN, BN) mixture
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        using_bn: bool = True,
        last_gamma: bool = False,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        process_group: Any = None,
        backend: str = "auto",
    ) -> None:
        take_backend(self, type(self).__name__, backend)
        # Read by reset_parameters, which the base constructor calls.
        self.using_bn = bool(using_bn)
        self.last_gamma = bool(last_gamma)
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            bool(track_running_stats) and self.using_bn,
            device,
            dtype,
            process_group,
        )
        k = len(self.components)
        self.mean_weight = nn.Parameter(torch.ones(k, device=device, dtype=dtype))
        self.var_weight = nn.Parameter(torch.ones(k, device=device, dtype=dtype))

    @property
    def components(self) -> tuple[str, ...]:
        """Names of the mixed normalizers, in the order of the logits."""
        return switchable_norm_components(self._ranks[0], self.using_bn)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.affine and self.last_gamma:
            nn.init.zeros_(self.weight)
        for name in ("mean_weight", "var_weight"):
            p = getattr(self, name, None)
            if p is not None:
                nn.init.ones_(p)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = self._momentum_factor()
        return NF.switchable_norm(
            input,
            self.mean_weight,
            self.var_weight,
            self.weight,
            self.bias,
            running_mean=self.running_mean,
            running_var=self.running_var,
            training=self.training or self.running_mean is None,
            momentum=factor,
            eps=self.eps,
            using_bn=self.using_bn,
            backend=self.backend,
            process_group=self._sync_group(),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"using_bn={self.using_bn}, last_gamma={self.last_gamma}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}" + options_repr(self)
        )


class SwitchableNorm1d(_SwitchableNorm):
    __doc__ = _SwitchableNorm.__doc__
    _ranks = (2,)
    _layout = "(N, C); for (N, C, L) use SwitchableNorm2d on x.unsqueeze(-1)"


class SwitchableNorm2d(_SwitchableNorm, dims=2):
    pass


class SwitchableNorm3d(_SwitchableNorm, dims=3):
    pass


def _per_channel(name: str, key: str, t: Tensor, c: int) -> Tensor:
    """A (1, C, 1, ...) / (1, C) / (C,) checkpoint tensor as (C,)."""
    shape = tuple(t.shape)
    ok = (len(shape) == 1 and shape[0] == c) or (
        len(shape) >= 2 and shape[1] == c and all(s == 1 for i, s in enumerate(shape) if i != 1)
    )
    if not ok:
        raise ValueError(
            f"{name}: checkpoint entry {key!r} has shape {shape}, expected C={c} values "
            f"shaped (1, {c}, 1, ...) as the paper's code writes them (or ({c},)). Build "
            f"the module with num_features={shape[1] if len(shape) >= 2 else shape[0]}."
        )
    return t.reshape(c)


def load_reference_switchnorm_state_dict(
    module: _SwitchableNorm, state_dict: Mapping[str, Tensor], prefix: str = ""
) -> None:
    """Load a checkpoint of the paper's official PyTorch ``SwitchNorm1d/2d/3d`` into ``module``.

    The official code (switchablenorms/Switchable-Normalization, ``SwitchNorm*d``)
    stores ``weight`` / ``bias`` shaped (1, C, 1, 1) (2d), (1, C, 1, 1, 1) (3d) or
    (1, C) (1d), ``mean_weight`` / ``var_weight`` of shape (3,) ((2,) for 1d or
    ``using_bn=False``) in the same (IN, LN, BN) / (LN, BN) order as ours, and
    buffers ``running_mean`` / ``running_var`` shaped (1, C, 1) ((1, C) for 1d).
    They are reshaped to our (C,) and copied as they are.

    Momentum: the official code updates ``running = m·running + (1 − m)·batch``
    (m = 0.9 or 0.997), the reverse of torch's convention used here. That only
    matters for *future* updates: loaded values are copied; to continue training
    with the same averaging, build the module with ``momentum = 1 − m``. The
    official ``running_var`` stores the variance derived from unbiased per-instance
    variances, and starts at 0 (an untrained checkpoint's running_var is 0, so
    eval divides by sqrt(eps)). Checkpoints trained with
    ``using_moving_average=False`` hold *sums* over batches, which need that
    code's separate averaging pass before they are usable running statistics.
    ``num_batches_tracked`` (absent there) is left unchanged.

    Args:
        module: a :class:`SwitchableNorm1d/2d/3d` built with the checkpoint's C and
            ``using_bn``, with ``affine=True``.
        state_dict: the official module's ``state_dict()`` (or a whole model's).
        prefix: key prefix of the layer inside a whole model's state_dict, e.g.
            ``"layer1.0.sn1."`` (a ``"module."`` from DataParallel included).

    Raises:
        ValueError: missing or unexpected keys, or shapes that do not match the module.
    """
    name = type(module).__name__
    c = module.num_features
    keys = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix)}
    expected = {"weight", "bias", "mean_weight", "var_weight"}
    if module.using_bn:
        expected |= {"running_mean", "running_var"}
    missing = sorted(expected - set(keys))
    unexpected = sorted(k for k in keys if k not in expected and "." not in k)
    if missing or unexpected:
        hint = ""
        if "running_mean" in missing or "running_mean" in unexpected:
            hint = (
                " The checkpoint's using_bn differs from the module's "
                f"(using_bn={module.using_bn}); build the module to match."
            )
        raise ValueError(
            f"{name}: cannot load the official SwitchNorm checkpoint (prefix {prefix!r}): "
            f"missing keys {missing}, unexpected keys {unexpected}.{hint}"
        )
    if not module.affine:
        raise ValueError(
            f"{name}: the official SwitchNorm always has weight and bias; build the module "
            "with affine=True to load its checkpoint."
        )
    if module.using_bn and not module.track_running_stats:
        raise ValueError(
            f"{name}: the checkpoint has running statistics but the module was built with "
            "track_running_stats=False; build it with track_running_stats=True."
        )
    values: dict[str, Tensor] = {}
    for key in ("mean_weight", "var_weight"):
        t = state_dict[keys[key]]
        k = len(module.components)
        if tuple(t.shape) != (k,):
            raise ValueError(
                f"{name}: checkpoint entry {key!r} has shape {tuple(t.shape)}, but the module "
                f"mixes {k} normalizers {module.components} (using_bn={module.using_bn}); "
                "build the module with the checkpoint's using_bn."
            )
        values[key] = t
    for key in sorted(expected - {"mean_weight", "var_weight"}):
        values[key] = _per_channel(name, prefix + key, state_dict[keys[key]], c)
    with torch.no_grad():
        for key, t in values.items():
            getattr(module, key).copy_(t)
