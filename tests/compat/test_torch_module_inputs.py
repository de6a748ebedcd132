"""PyTorch's own ModuleInfo samples for its norm modules, run against normlab's twins.

For every norm module of torch's ``module_db`` that normlab mirrors, every
sample of its ``module_inputs_func`` (constructor arguments and an input), in
train and eval, fp64 and fp32: torch's module and normlab's are built with the
same arguments and the same random state (parameters and running statistics,
loaded into normlab from torch's state_dict, strictly), then stepped twice on
the sample input shifted off-center. Forward outputs, input and parameter
gradients and every buffer must agree. The error samples
(``module_error_inputs_func``) must raise torch's exception type, at
construction or at the first forward.

Where normlab differs on purpose, the case is listed in :data:`DELIBERATE`
with the reason; it is marked ``xfail(strict=True)``, so it fails the day
normlab starts to match.
"""

from __future__ import annotations

import pytest
import torch
from _torch_modules import common_modules

import normlab.nn as nnl
from _testing import assert_close

DTYPES = (torch.float64, torch.float32)
OFFSET = 3.0  # torch's samples are uniform in [-9, 9]; shift them off-center

# "<module>-<sample desc>-<train|eval>" (any dtype) -> why normlab differs.
DELIBERATE: dict[str, str] = {}


def _norm_infos() -> list:
    return [
        info
        for info in common_modules().module_db
        if "Norm" in info.module_cls.__name__ and hasattr(nnl, info.module_cls.__name__)
    ]


def _cases() -> list:
    params = []
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for info in _norm_infos():
            name = info.module_cls.__name__
            for training in (True, False):
                for dtype in DTYPES:
                    samples = info.module_inputs_func(
                        info, device="cpu", dtype=dtype, requires_grad=True, training=training
                    )
                    for sample in samples:
                        key = f"{name}-{sample.desc or 'default'}-{'train' if training else 'eval'}"
                        marks = ()
                        if key in DELIBERATE:
                            marks = (pytest.mark.xfail(strict=True, reason=DELIBERATE[key]),)
                        params.append(
                            pytest.param(
                                info,
                                sample,
                                training,
                                dtype,
                                id=f"{key}-{str(dtype).removeprefix('torch.')}",
                                marks=marks,
                            )
                        )
    return params


def _error_cases() -> list:
    params = []
    for info in _norm_infos():
        if info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        for i, err in enumerate(errors):
            params.append(pytest.param(info, err, id=f"{info.module_cls.__name__}-error{i}"))
    return params


def _build(cls, ctor, dtype):
    return cls(*ctor.args, **ctor.kwargs).to(dtype)


def _randomize(module: torch.nn.Module, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64)).to(dtype))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_((OFFSET + torch.randn(b.shape, generator=g, dtype=torch.float64)).to(dtype))
            elif name.endswith("running_var"):
                b.copy_((0.5 + 4 * torch.rand(b.shape, generator=g, dtype=torch.float64)).to(dtype))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)


def _compare_state(ours, ref, dtype):
    bo, bt = dict(ours.named_buffers()), dict(ref.named_buffers())
    assert bo.keys() == bt.keys()
    for n, t in bt.items():
        assert bo[n].dtype == t.dtype, n
        if torch.is_floating_point(t):
            assert_close(bo[n], t, dtype)
        else:
            assert torch.equal(bo[n], t), (n, bo[n], t)


@pytest.mark.parametrize("info,sample,training,dtype", _cases())
def test_module_input_matches_torch(info, sample, training, dtype):
    name = info.module_cls.__name__
    ref = _build(info.module_cls, sample.constructor_input, dtype)
    ours = _build(getattr(nnl, name), sample.constructor_input, dtype)
    _randomize(ref, dtype)
    ours.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ours.train(training)
    ref.train(training)
    x0 = sample.forward_input.args[0].detach()
    for step in range(2):
        x = (x0 + OFFSET) * (1.0 + 0.5 * step)
        xt = x.clone().requires_grad_(True)
        xo = x.clone().requires_grad_(True)
        try:
            yt = ref(xt)
        except (RuntimeError, ValueError) as e:  # torch refuses: normlab must too
            with pytest.raises(type(e)):
                ours(xo)
            return
        yo = ours(xo)
        assert yo.shape == yt.shape and yo.dtype == yt.dtype
        assert_close(yo, yt, dtype)
        dy = torch.randn(yt.shape, dtype=dtype, generator=torch.Generator().manual_seed(step))
        yt.backward(dy)
        yo.backward(dy)
        assert_close(xo.grad, xt.grad, dtype)
        for (n, po), (_, pt) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            assert (po.grad is None) == (pt.grad is None), n
            if pt.grad is not None:
                assert_close(po.grad, pt.grad, dtype)
        ours.zero_grad()
        ref.zero_grad()
        _compare_state(ours, ref, dtype)


@pytest.mark.parametrize("info,err", _error_cases())
def test_module_error_input_matches_torch(info, err):
    """torch's type (normlab's error may be a subclass, and may come at construction)."""
    cm = common_modules()
    sample = err.module_error_input
    with pytest.raises(err.error_type):  # the sample is still an error for torch
        m = info.module_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        if err.error_on == cm.ModuleErrorEnum.FORWARD_ERROR:
            m(*sample.forward_input.args, **sample.forward_input.kwargs)
    ours_cls = getattr(nnl, info.module_cls.__name__)
    with pytest.raises(err.error_type):
        m = ours_cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        m(*sample.forward_input.args, **sample.forward_input.kwargs)
