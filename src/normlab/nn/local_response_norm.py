"""LocalResponseNorm."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as NF
from .._core.checks import check_count

__all__ = ["LocalResponseNorm"]


class LocalResponseNorm(nn.Module):
    r"""Local response normalization across channels (Krizhevsky et al., 2012).

    .. math:: y_c = x_c \Big/ \Big(k + \frac{\alpha}{n}\sum_{c' \in \text{window}(c)}
              x_{c'}^2\Big)^{\beta}

    The window spans ``size`` channels centred on c, zero-padded at the edges;
    the divisor is always ``size`` (torch's convention). No parameters.

    Args:
        size: n, channels in the window.
        alpha, beta, k: as in the formula; k > 0.
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        self.size = check_count("LocalResponseNorm", "size", size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)

    def forward(self, input: Tensor) -> Tensor:
        return NF.local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
