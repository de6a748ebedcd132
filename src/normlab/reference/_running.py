"""Running statistics in torch's convention, shared by the norms that keep them.

``running <- (1 - m) * running + m * batch`` with ``m = momentum`` (the weight of the
new value) or the cumulative average when ``momentum is None``; the batch variance
that enters is the unbiased one. No torch here: this package is the independent oracle.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._common import as_f64


def ema_update(
    running: np.ndarray, batch: np.ndarray, momentum: float | None, num_batches_tracked: int
) -> np.ndarray:
    """torch's running-statistic update.

    ``running <- (1 - m) * running + m * batch``; ``m = momentum`` (the weight of the new
    value), or ``m = 1 / (num_batches_tracked + 1)`` (a cumulative average) when
    ``momentum is None``; ``num_batches_tracked`` is the count *before* this step.
    """
    m = 1.0 / (num_batches_tracked + 1) if momentum is None else float(momentum)
    return (1.0 - m) * running + m * batch


#: A running-statistics update: ``(x, running_mean, running_var, *, momentum=0.1,
#: num_batches_tracked=0) -> (running_mean, running_var, num_batches_tracked)``.
RunningUpdate = Callable[..., tuple[np.ndarray, np.ndarray, int]]


def running_update(
    name: str, batch_stats: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], doc: str
) -> RunningUpdate:
    """The function ``name`` (docstring ``doc``): one training batch's update of both stats.

    ``batch_stats(x)`` gives the batch values, ``(mean, unbiased variance)`` of shape
    (C,), for the float64 input; each running statistic then takes :func:`ema_update`
    and ``num_batches_tracked`` goes up by one. The norms differ only in those values.
    """

    def update(
        x: object,
        running_mean: object,
        running_var: object,
        *,
        momentum: float | None = 0.1,
        num_batches_tracked: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        batch_mean, batch_var = batch_stats(as_f64(x))
        new_mean = ema_update(as_f64(running_mean), batch_mean, momentum, num_batches_tracked)
        new_var = ema_update(as_f64(running_var), batch_var, momentum, num_batches_tracked)
        return new_mean, new_var, num_batches_tracked + 1

    update.__name__ = update.__qualname__ = name
    update.__doc__ = doc
    return update
