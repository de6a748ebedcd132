"""Direct tests of the statistics core (normlab._core.stats) and its cross-process merge.

Against float64 NumPy on fresh random off-center data: fp32 data with mean 1e4 and
standard deviation 1e-2 (where E[x²] − E[x]² returns noise), half inputs whose
statistics come back in fp32, and the empty / one-element edge cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _testing import offcenter
from normlab._core import collectives
from normlab._core import stats as S

F32, F64 = torch.float32, torch.float64


def hard(*shape: int, seed: int) -> torch.Tensor:
    """fp32 data with mean 1e4 and std 1e-2 (CT-like), non-power-of-two shapes."""
    return offcenter(*shape, seed=seed, loc=1e4, scale=1e-2, dtype=F32)


def ref_moments(x: torch.Tensor, dims, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    a = x.detach().to(F64).numpy()
    return a.mean(axis=dims, keepdims=True), a.var(axis=dims, keepdims=True, ddof=ddof)


def close(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float = 0.0) -> None:
    a = actual.detach().to(F64).numpy()
    assert not np.isnan(a).any()
    np.testing.assert_allclose(a, expected, rtol=rtol, atol=atol)


def test_the_data_defeat_the_naive_formula() -> None:
    """The test data are hard: the raw-moment formula in fp32 is far off."""
    x = hard(5, 7, 3, seed=1)
    naive = (x * x).mean((0, 2)) - x.mean((0, 2)) ** 2
    _, var = ref_moments(x, (0, 2))
    assert np.abs(naive.numpy() - var.reshape(-1)).max() > 10 * var.max()


@pytest.mark.parametrize("dims", [(0, 2), (2,), (1,), (0, 1, 2)], ids=str)
@pytest.mark.parametrize("correction", [0, 1])
def test_moments_off_center_fp32(dims, correction) -> None:
    x = hard(5, 7, 3, seed=2)
    m = S.moments(x, dims, correction=correction)
    mean, var = ref_moments(x, dims, ddof=correction)
    assert m.mean.dtype == m.var.dtype == F32
    assert m.count == int(np.prod([x.shape[d] for d in dims]))
    close(m.mean, mean, rtol=1e-7)
    close(m.var, var, rtol=1e-5)
    assert torch.equal(m.shift, S.pivot(x, dims))


def test_moments_channels_last_and_negative_dims() -> None:
    x = hard(3, 5, 4, 6, seed=3).contiguous(memory_format=torch.channels_last)
    m = S.moments(x, (0, -2, -1))
    mean, var = ref_moments(x, (0, 2, 3))
    close(m.mean, mean, rtol=1e-7)
    close(m.var, var, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_statistics(dtype) -> None:
    x = offcenter(4, 6, 5, seed=4, dtype=dtype)
    m = S.moments(x, (0, 2))
    mean, var = ref_moments(x, (0, 2))  # of the half-rounded values
    assert m.mean.dtype == m.var.dtype == F32
    close(m.mean, mean, rtol=1e-6)
    close(m.var, var, rtol=1e-5)
    ms = S.mean_square(x, (2,))
    assert ms.dtype == F32
    a = x.to(F64).numpy()
    close(ms, (a * a).mean(axis=2, keepdims=True), rtol=1e-6)


def test_centered_moments_reuses_the_shift() -> None:
    x = hard(4, 3, 5, seed=5)
    shift = S.pivot(x, (0, 2))
    xc = S.centered(x, shift)
    m = S.centered_moments(xc, (0, 2), torch.zeros_like(shift))
    mean, var = ref_moments(x, (0, 2))
    close(m.mean + shift, mean, rtol=1e-7)  # the mean relative to the pivot
    close(m.var, var, rtol=1e-5)
    assert float(m.mean.abs().max()) < 1.0  # small: the digits are kept


def test_pivot_is_an_element_and_detached() -> None:
    x = hard(3, 4, 5, seed=6).requires_grad_()
    p = S.pivot(x, (0, 2))
    assert p.shape == (1, 4, 1) and not p.requires_grad
    assert torch.equal(p.reshape(-1), x.detach()[0, :, 0])


def test_empty_and_one_element() -> None:
    empty = torch.empty(0, 3, 4, dtype=F32, requires_grad=True)
    p = S.pivot(empty, (0, 2))
    assert p.shape == (1, 3, 1) and torch.equal(p, torch.zeros(1, 3, 1))
    m = S.centered_moments(S.centered(empty, p), (0, 2), p)
    assert m.count == 0 and torch.equal(m.var, torch.zeros(1, 3, 1))
    assert torch.equal(m.mean, torch.zeros(1, 3, 1))
    (g,) = torch.autograd.grad(m.var.sum() + m.mean.sum(), empty)  # still in the graph
    assert g.shape == empty.shape
    one = hard(1, 3, 1, seed=7)
    m1 = S.moments(one, (0, 2))
    assert m1.count == 1 and torch.equal(m1.var, torch.zeros(1, 3, 1))
    close(m1.mean, one.to(F64).numpy(), rtol=0)
    assert torch.isnan(S.moments(one, (0, 2), correction=1).var).all()  # as torch


def test_rstd_clamps_and_adds_eps() -> None:
    var = torch.tensor([4.0, 0.0, -1e-9, 2.25], dtype=F64)
    expected = 1.0 / np.sqrt(np.maximum(var.numpy(), 0) + 1e-3)
    close(S.rstd(var, 1e-3), expected, rtol=1e-15)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_union_of_groups_is_exact(k) -> None:
    """Per-group moments mixed by the law of total variance = the union's moments."""
    x = hard(3, 4 * k, 5, seed=10 + k).reshape(3, 4, k, 5)
    shift = S.pivot(x, (2, 3))  # one pivot per (n, c) group
    m = S.centered_moments(S.centered(x, shift), (3,), torch.zeros_like(shift))
    # group means relative to one pivot of the union (differences of pivots are exact)
    rel = m.mean + (shift - shift[:, :, :1])
    u_mean, u_var = S.mix_group_moments(rel, m.var, (2,))
    mean, var = ref_moments(x, (2, 3))
    close(u_mean + shift[:, :, :1], mean[..., 0][..., None], rtol=1e-7)
    close(u_var, var[..., 0][..., None], rtol=1e-5)
    _, _, dev = S.union_moments(rel, m.var, 2)
    close(dev.sum(2), np.zeros((3, 4, 1)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("tail", [False, True], ids=["gaussian", "pivot-in-tail"])
def test_one_pass_moments(per_sample, tail) -> None:
    x = hard(4, 3, 9, 11, seed=20)
    if tail:  # the pivot far out in its group's tail: the two-pass fallback runs
        x[:, :, 0, 0] += 1.0
    dims = (2, 3) if per_sample else (0, 2, 3)
    shift = S.pivot(x, dims)
    u = S.centered(x, shift)
    mean_c, var, count = S.one_pass_moments(u, per_sample)
    mean, ref_var = ref_moments(x, dims)
    assert count == int(np.prod([x.shape[d] for d in dims]))
    close(mean_c + shift, mean, rtol=1e-7)
    close(var, ref_var, rtol=1e-6)  # the plain one-pass formula is ~1e-5 off on the tail
    s0, s1 = S.dot_sums(u, u, per_sample)
    fallback = bool(((s0 / count) ** 2 > 64 * (s1 / count - (s0 / count) ** 2)).any())
    assert fallback == tail


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("dim", [1, 2])
def test_window_mean(size, dim) -> None:
    x = offcenter(2, 6, 5, seed=30, dtype=F32)
    a = x.to(F64).numpy()
    lo, hi = size // 2, (size - 1) // 2
    pad = [(0, 0)] * a.ndim
    pad[dim] = (lo, hi)
    p = np.pad(a, pad)
    expected = (
        np.stack(
            [p.take(range(i, i + size), axis=dim).sum(axis=dim) for i in range(a.shape[dim])],
            axis=dim,
        )
        / size
    )
    out = S.window_mean(x, dim, size)
    assert out.dtype == F32
    close(out, expected, rtol=1e-6)


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "half"])
def test_dot_sums_with_a_shift(per_sample, layout) -> None:
    dtype = torch.float16 if layout == "half" else F32
    a = offcenter(3, 4, 5, 6, seed=40, dtype=dtype)
    b = offcenter(3, 4, 5, 6, seed=41, loc=50.0, dtype=dtype)
    if layout == "channels_last":
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    dims = (2, 3) if per_sample else (0, 2, 3)
    shift = S.pivot(b, dims)
    s_a, s_ab = S.dot_sums(a, b, per_sample, shift=shift)
    assert s_a.dtype == s_ab.dtype == F32
    a64, bc = a.to(F64).numpy(), (b.to(F64) - shift.to(F64)).numpy()
    close(s_a, a64.sum(axis=dims, keepdims=True), rtol=1e-5, atol=1e-4)
    close(s_ab, (a64 * bc).sum(axis=dims, keepdims=True), rtol=1e-5, atol=1e-3)
    ss = S.sum_of_squares(a.to(F32), dims)
    close(ss, (a64 * a64).sum(axis=dims, keepdims=True), rtol=1e-5)


# ----------------------------------------------------------------------------- the merge


def test_group_moments_merge_every_rank(monkeypatch) -> None:
    """Chan's merge over three ranks (one of them empty) equals the moments of the union.

    The all_gather is replaced by the packed rows of the simulated ranks.
    """
    x = hard(7, 3, 4, seed=50)
    parts = [x[:4], x[4:4], x[4:]]
    dims = (0, 2)
    rows: list[torch.Tensor] = []

    def record(local, group):
        rows.append(local.clone())
        return local.reshape(1, -1)

    def prepared(shifts):
        monkeypatch.setattr(collectives, "_all_gather_flat", record)
        for part, shift in zip(parts, shifts, strict=True):
            collectives.group_moments(S.centered(part, shift), dims, shift, group=None)
        gathered = torch.stack(rows)
        monkeypatch.setattr(collectives, "_all_gather_flat", lambda local, group: gathered)

    shifts = [S.pivot(p, dims) for p in parts]
    prepared(shifts)
    mean, var = ref_moments(x, dims)
    for part, shift in zip(parts, shifts, strict=True):
        g, count = collectives.group_moments(S.centered(part, shift), dims, shift, group=None)
        assert count == part.shape[0] * part.shape[2]
        assert int(g.count) == x.shape[0] * x.shape[2]
        close(g.mean + shift, mean, rtol=1e-7)  # relative to this rank's shift
        close(g.mean_abs, mean, rtol=1e-7)
        close(g.var, var, rtol=1e-5)
