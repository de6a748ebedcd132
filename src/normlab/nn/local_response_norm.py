"""LocalResponseNorm."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as NF

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
        if size < 1:
            raise ValueError(f"LocalResponseNorm: size must be >= 1, got {size}.")
        self.size = int(size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.k = float(k)

    def forward(self, input: Tensor) -> Tensor:
        return NF.local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"
