"""The one dispatch decision: its table and its answers.

Every functional that takes ``backend=`` asks :func:`normlab._core.dispatch.choose_path`
exactly once per call, for an op of :data:`~normlab._core.dispatch.TABLE`; every op
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
from types import SimpleNamespace

import pytest
import torch

import normlab.functional as NF
from _testing import offcenter
from normlab._core import dispatch
from normlab._core.dispatch import TABLE, Op, Path, choose_path

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
    assert set(TABLE) == set(Op)
    assert _ops_named_in_functionals() == set(Op)
    assert all(op.value.isidentifier() for op in Op)  # identifiers, not display strings


def test_every_missing_path_has_a_reason() -> None:
    for op, paths in TABLE.items():
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


CALLS = {
    "batch_norm": lambda: NF.batch_norm(X, C4.clone(), POS4.clone(), C4, C4, training=True),
    "batch_norm_eval": lambda: NF.batch_norm(X, C4, POS4, C4, C4, training=False),
    "frozen_batch_norm": lambda: NF.frozen_batch_norm(X, C4, C4, C4, POS4),
    "batch_renorm": lambda: NF.batch_renorm(X, C4.clone(), POS4.clone(), C4, C4, training=True),
    "batch_renorm_eval": lambda: NF.batch_renorm(X, C4, POS4, C4, C4, training=False),
    "moving_average_batch_norm": lambda: _mabn(True),
    "moving_average_batch_norm_eval": lambda: _mabn(False),
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


def _cuda_stand_in(dtype=torch.float32):
    return SimpleNamespace(
        is_cuda=True, dtype=dtype, device=torch.device("cuda"), requires_grad=False
    )


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


def test_cuda_stand_in_decisions(monkeypatch) -> None:
    cuda_x = _cuda_stand_in()
    monkeypatch.setattr(dispatch, "available", lambda: True)
    assert choose_path(Op.GROUP_NORM, cuda_x, "auto", None) is Path.TRITON
    assert choose_path(Op.SWITCHABLE_NORM, cuda_x, "auto", None) is Path.TRITON
    assert choose_path(Op.BATCH_NORM, cuda_x, "auto", None) is Path.AUTOGRAD  # no kernel
    assert choose_path(Op.EVONORM_B0, cuda_x, "auto", None) is Path.AUTOGRAD  # fused: CPU only
    assert choose_path(Op.GROUP_NORM, cuda_x, "torch", None) is Path.AUTOGRAD
    assert choose_path(Op.GROUP_NORM, _cuda_stand_in(torch.int32), "auto", None) is Path.AUTOGRAD
    group = object()  # a process group: the kernels compute local statistics only
    assert choose_path(Op.SWITCHABLE_NORM, cuda_x, "auto", group) is Path.AUTOGRAD
    with pytest.raises(RuntimeError, match="computes local statistics only"):
        choose_path(Op.SWITCHABLE_NORM, cuda_x, "triton", group)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # ONNX: no Triton ops
    assert choose_path(Op.GROUP_NORM, cuda_x, "auto", None) is Path.AUTOGRAD
    monkeypatch.undo()
    monkeypatch.setattr(dispatch, "available", lambda: False)
    assert choose_path(Op.GROUP_NORM, cuda_x, "auto", None) is Path.AUTOGRAD


def test_errors_quote_the_table(monkeypatch) -> None:
    x = offcenter(2, 3, 4, seed=1)
    for op in (Op.LAYER_NORM, Op.BATCH_NORM, Op.EVONORM_B0):
        paths = TABLE[op]
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
