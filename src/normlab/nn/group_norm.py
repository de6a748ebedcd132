"""GroupNorm (torch's argument order)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .. import functional as NF
from .._core.checks import check_channels, check_eps, check_groups, check_rank
from ._base import add_affine, reset_affine
from ._kernel_options import options_repr, take_act_backend

__all__ = ["GroupNorm"]


class GroupNorm(nn.Module):
    r"""Group normalization (Wu & He, ECCV 2018).

    .. math:: y_{n,c} = \frac{x_{n,c} - \mu_{n,g(c)}}{\sqrt{\sigma^2_{n,g(c)} + \epsilon}}
              \gamma_c + \beta_c

    Statistics over (C/G, \*spatial) for each sample and group of C/G channels,
    biased variance. Independent of the batch size: the same in train and eval,
    exact at batch 1. ``num_groups=1`` is LayerNorm over (C, \*spatial);
    ``num_groups=C`` is InstanceNorm. The paper's default is G = 32.

    Args:
        num_groups: G, must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance, >= 0.
        affine: learn per-channel γ (``weight``) and β (``bias``).
        bias: with ``affine``, learn β too; ``bias=False`` leaves ``self.bias``
            None and out of the state_dict, as in torch.
        act: None, ``"silu"`` or ``"relu"``: an activation applied after the affine
            map, fused into the kernel on the Triton backend (GroupNorm + SiLU is the
            diffusion-UNet block).
        backend: ``"auto"`` (fused Triton kernels for CUDA input when triton imports,
            torch otherwise), ``"torch"`` or ``"triton"``; see
            :func:`normlab.functional.group_norm`.

    Shape: (N, C) or (N, C, \*spatial) with up to 3 spatial dims; any memory format.

    Example::

        >>> gn = normlab.nn.GroupNorm(32, 64)
        >>> y = gn(torch.randn(2, 64, 28, 28))
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        act: str | None = None,
        backend: str = "auto",
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        layer = type(self).__name__
        check_groups(layer, num_channels, num_groups)
        check_eps(layer, eps, zero_ok=True)
        take_act_backend(self, layer, act, backend)
        factory = {"device": device, "dtype": dtype}
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.affine = affine
        add_affine(self, self.num_channels, affine, factory, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self)

    def forward(self, input: Tensor) -> Tensor:
        layer = type(self).__name__
        check_rank(layer, input, (2, 3, 4, 5), "(N, C, *spatial)")
        check_channels(layer, input, self.num_channels)
        return NF.group_norm(
            input,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            act=self.act,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"
        if self.affine and self.bias is None:
            s += ", bias=False"
        return s + options_repr(self)
