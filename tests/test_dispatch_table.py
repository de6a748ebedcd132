"""The one dispatch decision: its table and its answers.

Every functional that takes ``backend=`` asks :func:`normlab._core.dispatch.choose_path`
exactly once per call, for an op of :data:`~normlab._core.dispatch.OP_PATHS`; every op
in the table is used by a functional; every missing path has a reason, which the
error for ``backend="triton"`` quotes. The decisions for CPU, a CUDA stand-in, a
tensor subclass, ``torch.compile``, ONNX export, ``torch.func`` and a process group
are checked on the function itself.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib

import pytest
import torch

import normlab.functional as NF
from _testing import offcenter
from normlab._core import dispatch, measured
from normlab._core.dispatch import OP_PATHS, Op, Path, choose_path

FUNCTIONAL = pathlib.Path(NF.__file__).parent


def _ops_named_in_functionals() -> set[Op]:
    """Every ``Op.NAME`` written in normlab/functional/*.py."""
    found = set()
    for path in FUNCTIONAL.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Op"
            ):
                found.add(Op[node.attr])
    return found


def test_every_op_is_in_the_table_and_used() -> None:
    assert set(OP_PATHS) == set(Op)
    assert _ops_named_in_functionals() == set(Op)
    assert all(op.value.isidentifier() for op in Op)  # identifiers, not display strings


def test_every_missing_path_has_a_reason() -> None:
    for op, paths in OP_PATHS.items():
        assert paths.label, op
        present = [p for p in (paths.triton, paths.fused, paths.autograd) if p is None]
        assert present, f"{op} has no path at all"
        for reason in (paths.triton, paths.fused, paths.autograd):
            assert reason is None or (isinstance(reason, str) and len(reason) > 20), op


# One valid small call of every functional that takes backend=.
X = offcenter(3, 4, 5, 2, seed=11)
C4 = offcenter(4, seed=12, loc=1.0, scale=0.2)
POS4 = offcenter(4, seed=13, loc=2.0, scale=0.2)


def _mabn(training: bool):
    m = 2
    state = dict(
        chi_window=torch.zeros(m, 4, dtype=torch.float64),
        psi_window=torch.zeros(m, 4, dtype=torch.float64),
        psi_filled=torch.zeros((), dtype=torch.long),
        num_batches_tracked=torch.zeros((), dtype=torch.long),
    )
    return NF.moving_average_batch_norm(
        X, POS4.clone(), C4, C4, training=training, warmup_iters=1, **state
    )


def _cbn(training: bool):
    from normlab.functional.cross_iteration_batch_norm import IterationWindow

    w = offcenter(4, 2, 1, 1, seed=14).requires_grad_()
    x = torch.nn.functional.conv2d(X[:, :2], w)
    window = IterationWindow.empty(2, w, torch.float64)
    return NF.cross_iteration_batch_norm(
        x, C4.clone(), POS4.clone(), C4, C4, training=training, conv_weight=w, window=window
    )


CALLS = {
    "batch_norm": lambda: NF.batch_norm(X, C4.clone(), POS4.clone(), C4, C4, training=True),
    "batch_norm_eval": lambda: NF.batch_norm(X, C4, POS4, C4, C4, training=False),
    "frozen_batch_norm": lambda: NF.frozen_batch_norm(X, C4, C4, C4, POS4),
    "batch_renorm": lambda: NF.batch_renorm(X, C4.clone(), POS4.clone(), C4, C4, training=True),
    "batch_renorm_eval": lambda: NF.batch_renorm(X, C4, POS4, C4, C4, training=False),
    "moving_average_batch_norm": lambda: _mabn(True),
    "moving_average_batch_norm_eval": lambda: _mabn(False),
    "cross_iteration_batch_norm": lambda: _cbn(True),
    "cross_iteration_batch_norm_eval": lambda: _cbn(False),
    "group_norm": lambda: NF.group_norm(X, 2, C4, C4),
    "instance_norm": lambda: NF.instance_norm(X),
    "layer_norm": lambda: NF.layer_norm(X, (2,)),
    "layer_norm2d": lambda: NF.layer_norm2d(X, C4, C4),
    "local_response_norm": lambda: NF.local_response_norm(X, 3),
    "rms_norm": lambda: NF.rms_norm(X, (2,)),
    "rms_norm2d": lambda: NF.rms_norm2d(X, C4),
    "switchable_norm": lambda: NF.switchable_norm(X, C4[:3], C4[1:], C4, C4),
    "filter_response_norm": lambda: NF.filter_response_norm(X, C4, C4),
    "frn_tlu": lambda: NF.frn_tlu(X, C4, C4, C4),
    "tlu": lambda: NF.tlu(X, C4),
    "evonorm_b0": lambda: NF.evonorm_b0(X, None, C4, C4, C4, training=True),
    "evonorm_s0": lambda: NF.evonorm_s0(X, 2, C4, C4, C4),
}


def test_every_backend_functional_is_covered() -> None:
    with_backend = {
        name for name in NF.__all__ if "backend" in inspect.signature(getattr(NF, name)).parameters
    }
    called = {op.split("_eval")[0] for op in CALLS}
    assert with_backend <= called, with_backend - called


@pytest.mark.parametrize("op", sorted(CALLS))
def test_each_functional_asks_once(op: str, monkeypatch) -> None:
    asked: list[Op] = []

    def counting(o, *args, **kwargs):
        asked.append(Op(o))
        return choose_path(o, *args, **kwargs)

    for path in FUNCTIONAL.glob("*.py"):
        module = importlib.import_module(f"normlab.functional.{path.stem}")
        if hasattr(module, "choose_path"):
            monkeypatch.setattr(module, "choose_path", counting)
    CALLS[op]()
    assert asked == [Op(op)]


# ----------------------------------------------------------------------------- decisions


class Sub(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_cpu_decisions() -> None:
    x = offcenter(2, 3, 4, seed=1)
    assert choose_path(Op.SWITCHABLE_NORM, x, "auto", None) is Path.FUSED
    assert choose_path(Op.SWITCHABLE_NORM, x, "torch", None) is Path.FUSED
    assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD
    assert choose_path(Op.BATCH_RENORM_EVAL, x, "auto", None) is Path.AUTOGRAD
    assert choose_path("evonorm_s0", x, "auto", None) is Path.FUSED  # identifiers work
    assert choose_path(Op.EVONORM_S0, x[:0], "auto", None) is Path.AUTOGRAD  # empty
    # A constant that asks for a gradient: only plain autograd gives it one.
    rv = offcenter(3, seed=2).abs().requires_grad_()
    assert choose_path(Op.EVONORM_B0, x, "auto", None, constants=(rv,)) is Path.AUTOGRAD
    assert choose_path(Op.EVONORM_B0, x, "auto", None, constants=(rv.detach(),)) is Path.FUSED


def test_subclass_and_context_decisions(monkeypatch) -> None:
    x = offcenter(2, 3, 4, seed=1)
    sub = x.as_subclass(Sub)
    for op in (Op.SWITCHABLE_NORM, Op.BATCH_RENORM, Op.FRN_TLU, Op.EVONORM_B0):
        assert choose_path(op, sub, "auto", None) is Path.AUTOGRAD
        assert choose_path(op, x, "auto", None, sub) is Path.AUTOGRAD  # a subclass param
    # The only implementation of MABN training runs for subclasses too.
    assert choose_path(Op.MOVING_AVERAGE_BATCH_NORM, sub, "auto", None) is Path.FUSED
    with pytest.raises(RuntimeError, match=r"torch.func transforms.*ψ moving-average"):
        torch.func.vmap(lambda t: choose_path(Op.MOVING_AVERAGE_BATCH_NORM, t, "auto", None))(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert choose_path(Op.SWITCHABLE_NORM, x, "auto", None) is Path.AUTOGRAD


KERNEL_OPS = [op for op, p in OP_PATHS.items() if p.triton is None]


@pytest.fixture
def cuda_like(monkeypatch):
    """Real CPU tensors that dispatch takes for CUDA tensors on a tested setup: an
    NVIDIA sm_90 GPU, triton 3.8, NORMLAB_TRITON unset, the measurement table empty."""
    monkeypatch.setattr(dispatch, "_is_cuda", lambda x: True)
    monkeypatch.setattr(dispatch, "available", lambda: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(dispatch, "_rocm", lambda: False)
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 8))
    monkeypatch.setattr(measured, "MEASURED", ())
    monkeypatch.delenv("NORMLAB_TRITON", raising=False)
    return monkeypatch


def _entry(op="group_norm", dtype="float32", layout="nchw", regime="n<=4/s<=64", ratio=1.3):
    return measured.Measurement(op, dtype, layout, regime, ratio, "test", "2026-01-01", "x.json")


def test_shipped_table_is_empty_and_well_formed() -> None:
    assert measured.MEASURED == ()  # nothing has been measured on a GPU
    assert set(measured.Measurement._fields) >= {"op", "dtype", "layout", "regime", "ratio"}
    assert {"device", "date", "source"} <= set(measured.Measurement._fields)


def test_auto_is_torch_for_every_op_unless_measured(cuda_like) -> None:
    x = offcenter(2, 4, 5, 3, seed=1)
    for op in Op:
        assert choose_path(op, x, "auto", None) is not Path.TRITON, op
    assert KERNEL_OPS, "no op has a kernel"


def test_a_measurement_enables_exactly_its_op_dtype_layout_regime(cuda_like) -> None:
    x = offcenter(2, 4, 5, 3, seed=1, dtype=torch.float32)  # nchw, n<=4, s=15
    assert measured.regime_of(x.shape) == "n<=4/s<=64"
    cuda_like.setattr(measured, "MEASURED", (_entry(),))
    assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.TRITON
    assert choose_path(Op.FRN_TLU, x, "auto", None) is not Path.TRITON  # another op
    assert choose_path(Op.GROUP_NORM, x.half(), "auto", None) is Path.AUTOGRAD  # dtype
    cl = x.contiguous(memory_format=torch.channels_last)
    assert measured.layout_of(cl) == "channels_last"
    assert choose_path(Op.GROUP_NORM, cl, "auto", None) is Path.AUTOGRAD  # layout
    big = offcenter(8, 4, 9, 9, seed=2, dtype=torch.float32)
    assert measured.regime_of(big.shape) == "n<=16/s<=4096"
    assert choose_path(Op.GROUP_NORM, big, "auto", None) is Path.AUTOGRAD  # regime
    assert measured.layout_of(x.transpose(2, 3)) == "strided"
    cuda_like.setattr(measured, "MEASURED", (_entry(ratio=1.05),))  # too little gain
    assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD
    assert measured.regime_of((17, 3, 65, 65)) == "n>16/s>4096"
    assert measured.regime_of((3, 8)) == "n<=4/s<=64"


def test_normlab_triton_switch(cuda_like) -> None:
    x = offcenter(2, 4, 5, 3, seed=1)
    cuda_like.setenv("NORMLAB_TRITON", "1")
    for op in KERNEL_OPS:
        assert choose_path(op, x, "auto", None) is Path.TRITON, op
    assert choose_path(Op.GROUP_NORM, x, "torch", None) is Path.AUTOGRAD
    cuda_like.setattr(measured, "MEASURED", (_entry(),))
    cuda_like.setenv("NORMLAB_TRITON", "0")
    for op in KERNEL_OPS:
        assert choose_path(op, x, "auto", None) is not Path.TRITON, op
    with pytest.raises(RuntimeError, match="NORMLAB_TRITON=0 turns the Triton kernels off"):
        choose_path(Op.GROUP_NORM, x, "triton", None)
    cuda_like.setenv("NORMLAB_TRITON", "yes")
    with pytest.raises(ValueError, match=r"NORMLAB_TRITON='yes' is not understood.*1.*0"):
        choose_path(Op.GROUP_NORM, x, "auto", None)
    cuda_like.setenv("NORMLAB_TRITON", "")
    assert dispatch.triton_switch() is None


def test_auto_keeps_every_guard_of_the_fused_path(cuda_like) -> None:
    """With the kernels switched on, each context of fused_allowed keeps auto on torch."""
    cuda_like.setenv("NORMLAB_TRITON", "1")
    x = offcenter(2, 4, 5, 3, seed=1)
    w = offcenter(4, seed=2)
    assert choose_path(Op.GROUP_NORM, x, "auto", None, w) is Path.TRITON
    assert choose_path(Op.GROUP_NORM, x.as_subclass(Sub), "auto", None) is Path.AUTOGRAD
    assert choose_path(Op.GROUP_NORM, x, "auto", None, w.as_subclass(Sub)) is Path.AUTOGRAD
    with torch.autograd.forward_ad.dual_level():
        assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD
    for name in ("is_tracing", "is_scripting"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.jit, name, lambda: True)
            assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD, name
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD
    assert choose_path(Op.GROUP_NORM, x.to(torch.int32), "auto", None) is Path.AUTOGRAD
    group = object()  # a process group: the kernels compute local statistics only
    assert choose_path(Op.SWITCHABLE_NORM, x, "auto", group) is not Path.TRITON
    with pytest.raises(RuntimeError, match="computes local statistics only"):
        choose_path(Op.SWITCHABLE_NORM, x, "triton", group)


def test_vmap_keeps_auto_off_the_kernels(cuda_like) -> None:
    cuda_like.setenv("NORMLAB_TRITON", "1")
    seen: list[Path] = []
    torch.func.vmap(lambda t: seen.append(choose_path(Op.GROUP_NORM, t, "auto", None)) or t)(
        offcenter(3, 2, 4, 5, seed=1)
    )
    assert seen == [Path.AUTOGRAD]


def test_auto_needs_nvidia_sm80_and_a_tested_triton(cuda_like) -> None:
    cuda_like.setenv("NORMLAB_TRITON", "1")
    x = offcenter(2, 4, 5, 3, seed=1)
    assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.TRITON
    cases = [
        ("_rocm", lambda: True, "ROCm"),
        ("_capability", lambda device: (7, 5), "compute capability 8.0"),
        ("triton_version", lambda: (3, 5), "tested with triton >= 3.6, < 3.9"),
        ("triton_version", lambda: (3, 9), "tested with triton >= 3.6, < 3.9"),
        ("available", lambda: False, ""),
    ]
    for name, fake, why in cases:
        with pytest.MonkeyPatch.context() as m:
            m.setattr(dispatch, name, fake)
            assert choose_path(Op.GROUP_NORM, x, "auto", None) is Path.AUTOGRAD, name
            assert why in (dispatch.auto_blocker(x) or ""), name
    for v in ((3, 5), (4, 0)):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(dispatch, "triton_version", lambda v=v: v)
            with pytest.raises(RuntimeError, match=r"kernels are tested with triton >= 3\.6"):
                choose_path(Op.GROUP_NORM, x, "triton", None)
    for v in ((3, 6), (3, 7), (3, 8)):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(dispatch, "triton_version", lambda v=v: v)
            assert choose_path(Op.GROUP_NORM, x, "triton", None) is Path.TRITON


def test_triton_version_parses_the_installed_one() -> None:
    pytest.importorskip("triton")
    major, minor = dispatch.triton_version()
    assert major >= 3 and minor >= 0


def test_errors_quote_the_table(monkeypatch) -> None:
    x = offcenter(2, 3, 4, seed=1)
    for op in (Op.LAYER_NORM, Op.BATCH_NORM, Op.EVONORM_B0):
        paths = OP_PATHS[op]
        with pytest.raises(RuntimeError, match="backend='triton' was requested") as e:
            choose_path(op, x, "triton", None)
        assert paths.triton in str(e.value) and str(e.value).startswith(paths.label)
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_path(Op.GROUP_NORM, x, "cuda", None)
    with pytest.raises(ValueError, match="unknown op 'batch_norm \\(eval\\)'"):
        choose_path("batch_norm (eval)", x, "auto", None)
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'normlab\[triton\]'"):
        choose_path(Op.GROUP_NORM, x, "triton", None)
