"""The float64 reference, checked from the math alone: finite differences and identities.

No torch here: the reference is the oracle the torch code is tested against, so it has to
stand on its own. Gradients are checked against central differences of the scalar loss
sum(forward(x) * R); forward properties pin the statistics and the running updates.
"""

from __future__ import annotations

import ast
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from _testing import numeric_grad
from normlab import reference as R

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "src" / "normlab" / "reference"


def off_center(rng: np.random.Generator, shape) -> np.ndarray:
    return 3.0 + 2.0 * rng.standard_normal(shape)


def assert_grad_close(analytic: np.ndarray, numeric: np.ndarray, name: str) -> None:
    assert analytic.shape == numeric.shape, name
    assert np.all(np.isfinite(analytic)), name
    atol = 1e-7 * max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=atol, err_msg=name)


# --------------------------------------------------------------------------- gradient cases


@dataclass(frozen=True)
class Case:
    """One labelled gradient check: forward(x, w, b) -> (y, cache), backward(dy, cache)."""

    id: str
    x_shape: tuple[int, ...]
    forward: Callable
    backward: Callable
    param_shape: tuple[int, ...] | None = None  # None: no weight/bias
    weight: bool = True
    bias: bool = True
    param_grads: bool = True  # False: weight/bias are buffers (frozen BN)


def channel_running(c: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(c)
    return rng.standard_normal(c), 0.5 + rng.random(c)


def bn_train(x, w, b):
    return R.batch_norm_forward(x, w, b, training=True)


def bn_eval(x, w, b):
    rm, rv = channel_running(x.shape[1])
    return R.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)


def frozen_bn(x, w, b):
    rm, rv = channel_running(x.shape[1])
    return R.frozen_batch_norm_forward(x, w, b, rm, rv)


def gn(groups):
    return lambda x, w, b: R.group_norm_forward(x, groups, w, b)


def ln(normalized_shape):
    return lambda x, w, b: R.layer_norm_forward(x, normalized_shape, w, b)


def ln2d(x, w, b):
    return R.layer_norm2d_forward(x, w, b)


def in_train(x, w, b):
    return R.instance_norm_forward(x, w, b)


def in_eval(x, w, b):
    rm, rv = channel_running(x.shape[1])
    return R.instance_norm_forward(x, w, b, running_mean=rm, running_var=rv, use_input_stats=False)


def lrn(size):
    return lambda x, w, b: R.local_response_norm_forward(x, size, alpha=0.5, beta=0.75, k=2.0)


BN, GN, LN = R.batch_norm_backward, R.group_norm_backward, R.layer_norm_backward
LN2D, IN, LRN = R.layer_norm2d_backward, R.instance_norm_backward, R.local_response_norm_backward
FBN = R.frozen_batch_norm_backward

CASES = [
    # BatchNorm: training (batch stats) and eval (running stats)
    Case("bn-rank2", (5, 3), bn_train, BN, (3,)),
    Case("bn-rank3-N1", (1, 3, 5), bn_train, BN, (3,)),
    Case("bn-rank4", (3, 2, 3, 2), bn_train, BN, (2,)),
    Case("bn-rank5", (2, 3, 2, 1, 3), bn_train, BN, (3,)),
    Case("bn-no-affine", (3, 3, 2), bn_train, BN),
    Case("bn-weight-only", (3, 3, 2), bn_train, BN, (3,), bias=False),
    Case("bn-eval", (2, 3, 4), bn_eval, BN, (3,)),
    Case("bn-eval-rank2", (3, 4), bn_eval, BN, (4,)),
    Case("frozen-bn", (2, 3, 2, 2), frozen_bn, FBN, (3,), param_grads=False),
    # GroupNorm
    Case("gn-rank2", (3, 6), gn(2), GN, (6,)),
    Case("gn-rank3-N1", (1, 6, 5), gn(2), GN, (6,)),
    Case("gn-rank4", (2, 6, 3, 2), gn(3), GN, (6,)),
    Case("gn-rank5", (1, 4, 2, 3, 2), gn(2), GN, (4,)),
    Case("gn-C-eq-G", (2, 3, 4), gn(3), GN, (3,)),
    Case("gn-G1", (2, 5, 3), gn(1), GN, (5,)),
    Case("gn-hw1", (2, 4, 1, 1), gn(2), GN, (4,)),
    Case("gn-no-affine", (2, 6, 3), gn(3), GN),
    Case("gn-bias-only", (2, 6, 3), gn(3), GN, (6,), weight=False),
    # LayerNorm (torch semantics: last dims) and LayerNorm2d (channels)
    Case("ln-rank2-N1", (1, 7), ln((7,)), LN, (7,)),
    Case("ln-rank3-last1", (2, 3, 5), ln(5), LN, (5,)),
    Case("ln-rank3-last2", (2, 3, 5), ln((3, 5)), LN, (3, 5)),
    Case("ln-rank4-hw1", (2, 3, 1, 1), ln((3, 1, 1)), LN, (3, 1, 1)),
    Case("ln-rank5", (2, 1, 2, 2, 3), ln((2, 3)), LN, (2, 3)),
    Case("ln-no-affine", (3, 6), ln((6,)), LN),
    Case("ln2d-rank2", (2, 5), ln2d, LN2D, (5,)),
    Case("ln2d-rank3", (2, 3, 4), ln2d, LN2D, (3,)),
    Case("ln2d-rank4-N1", (1, 5, 3, 2), ln2d, LN2D, (5,)),
    Case("ln2d-rank5", (1, 3, 2, 1, 2), ln2d, LN2D, (3,)),
    Case("ln2d-hw1", (2, 3, 1, 1), ln2d, LN2D, (3,), weight=False),
    # InstanceNorm
    Case("in-rank3-N1", (1, 3, 5), in_train, IN, (3,)),
    Case("in-rank4", (2, 3, 2, 3), in_train, IN, (3,)),
    Case("in-rank5", (2, 2, 2, 1, 3), in_train, IN, (2,)),
    Case("in-no-affine", (2, 3, 3), in_train, IN),
    Case("in-running", (2, 3, 4), in_eval, IN, (3,)),
    # LocalResponseNorm (no parameters)
    Case("lrn-rank3-N1-size3", (1, 5, 4), lrn(3), LRN),
    Case("lrn-rank4-size2", (2, 6, 2, 3), lrn(2), LRN),
    Case("lrn-rank4-size4", (2, 5, 2, 2), lrn(4), LRN),
    Case("lrn-rank5-size-gt-C", (1, 4, 2, 1, 2), lrn(5), LRN),
    Case("lrn-size1", (2, 3, 3), lrn(1), LRN),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backward_matches_finite_differences(case: Case) -> None:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))  # stable per case
    x = off_center(rng, case.x_shape)
    w = b = None
    if case.param_shape is not None:
        w = 1.0 + 0.5 * rng.standard_normal(case.param_shape) if case.weight else None
        b = rng.standard_normal(case.param_shape) if case.bias else None
    y, cache = case.forward(x, w, b)
    assert y.shape == x.shape and y.dtype == np.float64
    r = rng.standard_normal(y.shape)
    grads = case.backward(r, cache)

    def loss() -> float:
        return float(np.sum(case.forward(x, w, b)[0] * r))

    assert_grad_close(grads["dx"], numeric_grad(loss, x), f"{case.id}: dx")
    for key, p in (("dweight", w), ("dbias", b)):
        if case.param_shape is None and key not in grads:
            continue  # LRN: {"dx"} only
        if p is None or not case.param_grads:
            assert grads[key] is None, f"{case.id}: {key} should be None"
        else:
            assert_grad_close(grads[key], numeric_grad(loss, p), f"{case.id}: {key}")


# --------------------------------------------------------------------------- forward properties


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (3, 2, 3, 2)])
def test_batch_norm_normalizes_each_channel(shape) -> None:
    rng = np.random.default_rng(1)
    x, eps = off_center(rng, shape), 0.1
    y, _ = R.batch_norm_forward(x, eps=eps)
    axes = (0, *range(2, x.ndim))
    var = x.var(axis=axes)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), var / (var + eps), rtol=1e-12)


def test_batch_norm_eval_equals_frozen_and_folded_affine() -> None:
    rng = np.random.default_rng(2)
    x = off_center(rng, (2, 3, 4))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = channel_running(3)
    y_eval, _ = R.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, training=False)
    y_frozen, _ = R.frozen_batch_norm_forward(x, w, b, rm, rv, eps=1e-5)
    scale = w / np.sqrt(rv + 1e-5)
    folded = x * scale[:, None] + (b - rm * scale)[:, None]
    np.testing.assert_allclose(y_eval, y_frozen, rtol=1e-14)
    np.testing.assert_allclose(y_eval, folded, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 6, 5), (1, 4, 3, 2), (2, 3, 1, 1)])
def test_group_norm_one_group_is_layer_norm(shape) -> None:
    x = off_center(np.random.default_rng(3), shape)
    y_gn, _ = R.group_norm_forward(x, 1)
    y_ln, _ = R.layer_norm_forward(x, shape[1:])
    np.testing.assert_allclose(y_gn, y_ln, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 6, 5), (1, 4, 3, 2), (2, 3, 2, 1, 3)])
def test_group_norm_c_groups_is_instance_norm(shape) -> None:
    rng = np.random.default_rng(4)
    x = off_center(rng, shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y_gn, _ = R.group_norm_forward(x, shape[1], w, b)
    y_in, _ = R.instance_norm_forward(x, w, b)
    np.testing.assert_allclose(y_gn, y_in, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 4), (1, 5, 3, 2)])
def test_layer_norm2d_is_layer_norm_over_channels_last(shape) -> None:
    rng = np.random.default_rng(5)
    x = off_center(rng, shape)
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    y2d, _ = R.layer_norm2d_forward(x, w, b)
    y_last, _ = R.layer_norm_forward(np.moveaxis(x, 1, -1), shape[1], w, b)
    np.testing.assert_allclose(y2d, np.moveaxis(y_last, -1, 1), rtol=1e-12, atol=1e-12)


def test_layer_norm_per_row_statistics() -> None:
    x = off_center(np.random.default_rng(6), (3, 4, 5))
    y, _ = R.layer_norm_forward(x, (4, 5), eps=0.0)
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, rtol=1e-12)


def test_batch_norm_update_running_hand_case() -> None:
    x = np.array([[1.0], [3.0]])  # N=2, C=1: mean 2, unbiased var 2 (biased 1)
    m, v, n = R.batch_norm_update_running(x, np.array([0.0]), np.array([1.0]), momentum=0.1)
    np.testing.assert_allclose(m, [0.2], rtol=1e-15)  # 0.9 * 0 + 0.1 * 2
    np.testing.assert_allclose(v, [1.1], rtol=1e-15)  # 0.9 * 1 + 0.1 * 2
    assert n == 1
    # momentum=None: cumulative average, factor 1 / (num_batches_tracked + 1)
    m, v, n = R.batch_norm_update_running(x, np.array([5.0]), np.array([7.0]), momentum=None)
    np.testing.assert_allclose([m[0], v[0], n], [2.0, 2.0, 1])
    m, v, n = R.batch_norm_update_running(
        x, np.array([4.0]), np.array([6.0]), momentum=None, num_batches_tracked=1
    )
    np.testing.assert_allclose([m[0], v[0], n], [3.0, 4.0, 2])


def test_batch_norm_update_running_counts_spatial() -> None:
    # (N=1, C=2, L=2): per channel n = 2 values
    x = np.array([[[1.0, 3.0], [0.0, 4.0]]])
    m, v, _ = R.batch_norm_update_running(x, np.zeros(2), np.zeros(2), momentum=1.0)
    np.testing.assert_allclose(m, [2.0, 2.0])
    np.testing.assert_allclose(v, [2.0, 8.0])


def test_instance_norm_update_running_hand_case() -> None:
    # (N=2, C=1, L=2): per-(n, c) means 2 and 4, unbiased variances 2 and 8
    x = np.array([[[1.0, 3.0]], [[2.0, 6.0]]])
    m, v, n = R.instance_norm_update_running(x, np.array([1.0]), np.array([1.0]), momentum=0.5)
    np.testing.assert_allclose(m, [2.0])  # 0.5 * 1 + 0.5 * mean(2, 4)
    np.testing.assert_allclose(v, [3.0])  # 0.5 * 1 + 0.5 * mean(2, 8)
    assert n == 1
    m, v, n = R.instance_norm_update_running(
        x, np.array([9.0]), np.array([9.0]), momentum=None, num_batches_tracked=2
    )
    np.testing.assert_allclose([m[0], v[0], n], [(2 * 9 + 3) / 3, (2 * 9 + 5) / 3, 3])


def test_local_response_norm_hand_case() -> None:
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    # alpha / size = 1, k = 0, beta = 1: y_c = x_c / sum_{window} x^2
    y3, _ = R.local_response_norm_forward(x, 3, alpha=3.0, beta=1.0, k=0.0)
    np.testing.assert_allclose(y3.ravel(), [1 / 5, 2 / 14, 3 / 13])  # windows [c-1, c+1]
    y2, _ = R.local_response_norm_forward(x, 2, alpha=2.0, beta=1.0, k=0.0)
    np.testing.assert_allclose(y2.ravel(), [1 / 1, 2 / 5, 3 / 13])  # windows [c-1, c]
    # divisor is always `size`, even where the window is clipped at the edges
    y, _ = R.local_response_norm_forward(x, 4, alpha=1.0, beta=1.0, k=1.0)
    np.testing.assert_allclose(y.ravel(), [1 / (1 + 5 / 4), 2 / (1 + 14 / 4), 3 / (1 + 14 / 4)])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: R.batch_norm_forward(np.ones((1, 3))), id="bn-one-value"),
        pytest.param(lambda: R.batch_norm_forward(np.ones((2, 3)), training=False), id="bn-eval"),
        pytest.param(lambda: R.instance_norm_forward(np.ones((2, 3, 1))), id="in-hw1"),
        pytest.param(lambda: R.instance_norm_forward(np.ones((2, 3))), id="in-rank2"),
        pytest.param(lambda: R.group_norm_forward(np.ones((2, 6, 3)), 4), id="gn-divisible"),
        pytest.param(lambda: R.layer_norm_forward(np.ones((2, 3)), (4,)), id="ln-shape"),
        pytest.param(lambda: R.local_response_norm_forward(np.ones((2, 3)), 2), id="lrn-rank2"),
        pytest.param(
            lambda: R.batch_norm_forward(np.ones((2, 3)), weight=np.ones(4)), id="bn-weight"
        ),
    ],
)
def test_invalid_input_raises_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- independence


def test_reference_package_imports_no_torch() -> None:
    files = sorted(REFERENCE_DIR.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "_common.py", "batch_norm.py"}
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in {"torch", "triton"}, f"{path.name} imports {name}"
