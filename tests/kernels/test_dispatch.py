"""Backend dispatch: "torch" and "triton" agree through the functional ops and the
modules, "auto" keeps CPU input on torch, errors say what is missing and the fix,
and importing normlab never imports triton."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _kernel_cases import DEVICE, check, make_param, make_x, requires_kernels

import normlab.functional as NF
import normlab.nn as nnl
from normlab import kernels
from normlab._core import dispatch, measured
from normlab._core.dispatch import resolve_backend

requires_kernels()


def _grads(fn, x, params):
    y = fn(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=y.dtype)
    return (y, *torch.autograd.grad(y, [x, *params], dy.to(y.device)))


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_group_norm_torch_and_triton_agree(act, fmt):
    x = make_x((2, 6, 5, 3), torch.float32, fmt)
    w, b = make_param(6, torch.float32, 1), make_param(6, torch.float32, 2, loc=0.0)
    out = {
        be: _grads(lambda t, be=be: NF.group_norm(t, 3, w, b, act=act, backend=be), x, [w, b])
        for be in ("torch", "triton")
    }
    for a, e, name in zip(out["triton"], out["torch"], ("y", "dx", "dw", "db"), strict=True):
        check(a, e, torch.float32, name)


def test_group_norm_module_backend_and_act():
    torch.manual_seed(0)
    ref = nnl.GroupNorm(2, 4, act="relu", backend="torch").to(DEVICE)
    tri = nnl.GroupNorm(2, 4, act="relu", backend="triton").to(DEVICE)
    with torch.no_grad():
        for m in (ref, tri):
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    x = make_x((2, 4, 3, 3), torch.float32, "cl")
    check(tri(x), ref(x), torch.float32, "y")
    assert "act='relu'" in repr(tri) and "backend='triton'" in repr(tri)
    assert "backend" not in repr(nnl.GroupNorm(2, 4))


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_eval_batch_norm_and_frozen_bn_torch_and_triton_agree(fmt):
    x = make_x((3, 5, 4, 3), torch.float32, fmt)
    w, b = make_param(5, torch.float32, 1), make_param(5, torch.float32, 2, loc=0.0)
    rm = make_param(5, torch.float32, 3, loc=3.0, grad=False)
    rv = make_param(5, torch.float32, 4, loc=4.0, grad=False)
    for fn in (
        lambda t, be: NF.batch_norm(t, rm, rv, w, b, False, backend=be),
        lambda t, be: NF.frozen_batch_norm(t, w, b, rm, rv, act="silu", backend=be),
    ):
        got = _grads(lambda t, fn=fn: fn(t, "triton"), x, [w, b])
        want = _grads(lambda t, fn=fn: fn(t, "torch"), x, [w, b])
        for a, e, name in zip(got, want, ("y", "dx", "dw", "db"), strict=True):
            check(a, e, torch.float32, name)


def test_frozen_bn_module_backend():
    m = nnl.FrozenBatchNorm2d(4, backend="triton", act="relu")
    t = nnl.FrozenBatchNorm2d(4, act="relu")
    with torch.no_grad():
        for mod in (m, t):
            mod.running_mean.copy_(torch.arange(4.0))
            mod.weight.copy_(torch.linspace(-1.0, 2.0, 4))
    x = make_x((2, 4, 3, 3), torch.float32, "cl").detach()
    check(m(x), t(x), torch.float32, "y")


def test_auto_keeps_cpu_input_on_torch(monkeypatch):
    """Even with the interpreter on, "auto" never sends a CPU tensor to the kernels."""
    x = torch.randn(2, 4, 3)
    assert resolve_backend("group_norm", "auto", x) == "torch"
    assert resolve_backend("frozen_batch_norm", "auto", x) == "torch"

    def boom(*a, **k):
        raise AssertionError("auto called the Triton kernel for a CPU tensor")

    monkeypatch.setattr(kernels, "fused_group_norm", boom)
    monkeypatch.setattr(kernels, "fused_frozen_batch_norm", boom)
    NF.group_norm(x, 2)
    NF.frozen_batch_norm(x, torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4))
    nnl.GroupNorm(2, 4)(x)
    nnl.BatchNorm1d(4).eval()(x)


@pytest.fixture
def cuda_like(monkeypatch):
    """CPU tensors taken for CUDA ones by the dispatch (the interpreter runs them):
    a tested NVIDIA setup, NORMLAB_TRITON unset, the measurement table empty."""
    monkeypatch.setattr(dispatch, "_is_cuda", lambda x: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(dispatch, "_rocm", lambda: False)
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 8))
    monkeypatch.setattr(measured, "MEASURED", ())
    monkeypatch.delenv("NORMLAB_TRITON", raising=False)
    return monkeypatch


def _spy(monkeypatch) -> list[str]:
    """Record each call of a kernel entry point (which still runs)."""
    calls: list[str] = []
    for name in ("fused_group_norm", "fused_frozen_batch_norm", "fused_filter_response_norm",
                 "fused_switchable_norm"):  # fmt: skip
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(kernels, name, spy)
    return calls


def _modules():
    return [
        nnl.GroupNorm(2, 4),
        nnl.BatchNorm2d(4).eval(),
        nnl.FrozenBatchNorm2d(4),
        nnl.FilterResponseNorm2d(4),
        nnl.SwitchableNorm2d(4),
    ]


def test_auto_is_torch_on_cuda_until_measured_or_switched_on(cuda_like):
    """Functionals and modules: auto runs torch for a (stand-in) CUDA tensor; with
    NORMLAB_TRITON=1 every module runs its kernel; with 0 none does, and an explicit
    backend='triton' module says why it cannot run."""
    calls = _spy(cuda_like)
    x = make_x((2, 4, 3, 3), torch.float32).detach()
    w = torch.ones(4)
    for m in _modules():
        m(x)
    NF.group_norm(x, 2)
    assert calls == []
    cuda_like.setattr(measured, "MEASURED", (measured.Measurement(
        "group_norm", "float32", "nchw", measured.regime_of(x.shape), 1.5, "test", "2026-01-01",
        "x.json",
    ),))  # fmt: skip
    NF.group_norm(x, 2, w)
    assert calls == ["fused_group_norm"]
    calls.clear()
    cuda_like.setenv("NORMLAB_TRITON", "1")
    want = {}
    for m in _modules():
        want[type(m).__name__] = m(x)
    assert calls == ["fused_group_norm", "fused_frozen_batch_norm", "fused_frozen_batch_norm",
                     "fused_filter_response_norm", "fused_switchable_norm"]  # fmt: skip
    calls.clear()
    cuda_like.setenv("NORMLAB_TRITON", "0")
    for m in _modules():
        check(m(x), want[type(m).__name__], torch.float32, type(m).__name__)
    NF.group_norm(x, 2, w)
    assert calls == []
    with pytest.raises(RuntimeError, match="NORMLAB_TRITON=0"):
        nnl.GroupNorm(2, 4, backend="triton")(x)
    with pytest.raises(RuntimeError, match="NORMLAB_TRITON=0"):
        nnl.SwitchableNorm2d(4, backend="triton")(x)


def test_triton_without_triton_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    assert not kernels.available()
    with pytest.raises(RuntimeError, match=r"pip install 'normlab\[triton\]'"):
        NF.group_norm(torch.randn(2, 4, 3), 2, backend="triton")
    # "auto" still works: torch.
    NF.group_norm(torch.randn(2, 4, 3), 2, backend="auto")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_switchable_norm_torch_and_triton_agree(training, fmt):
    """The module dispatches on backend=; outputs, grads and running stats agree."""
    mods = {}
    for be in ("torch", "triton"):
        m = nnl.SwitchableNorm2d(5, backend=be).to(DEVICE).train(training)
        with torch.no_grad():
            m.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
            m.var_weight.copy_(torch.tensor([-0.4, 0.1, 0.6]))
            m.weight.copy_(torch.linspace(0.5, 2.0, 5))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
            m.running_mean.copy_(torch.linspace(2.0, 3.0, 5))
            m.running_var.copy_(torch.linspace(0.5, 1.5, 5))
        mods[be] = m
    x = make_x((3, 5, 4, 3), torch.float32, fmt)
    out = {be: _grads(m, x, list(m.parameters())) for be, m in mods.items()}
    names = ("y", "dx", "dmean_weight", "dvar_weight", "dweight", "dbias")
    for a, e, name in zip(out["triton"], out["torch"], names, strict=True):
        check(a, e, torch.float32, name)
    for buf in ("running_mean", "running_var"):
        check(getattr(mods["triton"], buf), getattr(mods["torch"], buf), torch.float32, buf)
    assert "backend='triton'" in repr(mods["triton"])


@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("learnable_eps", [True, False])
def test_frn_module_torch_and_triton_agree(tlu, learnable_eps):
    mods = {}
    for be in ("torch", "triton"):
        m = nnl.FilterResponseNorm2d(5, learnable_eps=learnable_eps, tlu=tlu, backend=be)
        m = m.to(DEVICE)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2.0, 5))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
            if tlu:
                m.tau.copy_(torch.linspace(-0.3, 0.4, 5))
            m.eps.fill_(0.05)
        mods[be] = m
    x = make_x((3, 5, 4, 3), torch.float32, "cl")
    out = {be: _grads(m, x, list(m.parameters())) for be, m in mods.items()}
    names = [f"d{n}" for n, _ in mods["torch"].named_parameters()]
    for a, e, name in zip(out["triton"], out["torch"], ["y", "dx", *names], strict=True):
        check(a, e, torch.float32, name)
    assert "backend='triton'" in repr(mods["triton"])


def test_switchable_norm_module_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        nnl.SwitchableNorm2d(4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        nnl.FilterResponseNorm2d(4, backend="cuda")


def test_triton_on_cpu_without_the_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA") as e:
        NF.group_norm(torch.randn(2, 4, 3), 2, backend="triton")
    assert "TRITON_INTERPRET=1" in str(e.value)


def test_triton_for_ops_without_dispatch_is_a_clear_error():
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="only eval mode"):
        NF.batch_norm(x, torch.zeros(4), torch.ones(4), training=True, backend="triton")
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        resolve_backend("layer_norm", "triton", x)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("group_norm", "cuda", x)


def test_triton_under_vmap_is_a_clear_error():
    x = torch.randn(3, 2, 4, 3)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.vmap(lambda t: NF.group_norm(t, 2, backend="triton"))(x)


def test_act_is_validated_on_both_backends():
    for be in ("torch", "triton"):
        with pytest.raises(ValueError, match="act must be one of"):
            NF.group_norm(torch.randn(2, 4, 3), 2, act="gelu", backend=be)
    with pytest.raises(ValueError, match="act must be one of"):
        nnl.FrozenBatchNorm2d(4, act="tanh")


def test_importing_normlab_does_not_import_triton():
    """...nor does the torch path. Then, in the same fresh process: triton imported
    *before* TRITON_INTERPRET=1 is set (torch._dynamo imports it; so does a full test
    run) must not break the interpreted kernels."""
    code = (
        "import os, sys, torch, normlab, normlab.nn, normlab.functional as NF, normlab.kernels\n"
        "x = torch.randn(2, 4, 3)\n"
        "y = NF.group_norm(x, 2)\n"
        "normlab.nn.FrozenBatchNorm2d(4)(torch.randn(1, 4, 2, 2))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
        "import torch._dynamo\n"
        "assert 'triton' in sys.modules\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "torch.testing.assert_close(NF.group_norm(x, 2, backend='triton'), y)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)
