"""CPU autocast (bfloat16): the policy of docs/ecosystem.md, per layer.

* Norm layers follow torch's own norm layers under autocast: they are not
  lowered. The output dtype is the *input* dtype (fp32 in, fp32 out; bf16 in,
  bf16 out); statistics are always computed in fp32; running statistics and
  parameters stay fp32, also when a training step runs under autocast.
* WSConv2d / CenteredConv2d are convolutions: like ``nn.Conv2d`` they run in
  bf16 under autocast (bf16 output); the weight statistics are computed in fp32
  from the fp32 parameter before autocast casts the standardized weight.
"""

from __future__ import annotations

import pytest
import torch
from _eco_cases import CASES, make_input

import normlab.nn as nnl
from _testing import assert_close

CONVS = (nnl.WSConv2d, nnl.CenteredConv2d)


def _expected_dtype(case, input_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if case.cls in CONVS else input_dtype


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_cpu_bf16_policy(case, input_dtype):
    m = case.build().eval()
    x = make_input(case).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == _expected_dtype(case, input_dtype)
    reference = m(x.float())  # fp32, no autocast, from the same (possibly rounded) input
    if y.dtype == torch.float32:
        assert_close(y, reference, torch.float32)
    else:
        scale = max(1.0, reference.abs().max().item())
        assert_close(y, reference, torch.bfloat16, atol=2e-2 * scale)


@pytest.mark.parametrize("case", [c for c in CASES if c.stateful], ids=lambda c: c.name)
def test_training_under_autocast_keeps_fp32_state(case):
    m = case.build().train()
    eager = case.build().train()
    eager.load_state_dict(m.state_dict())
    x = make_input(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.requires_grad_())
    y.float().sum().backward()
    eager(x.detach()).sum()
    for (name, b), (_, e) in zip(m.named_buffers(), eager.named_buffers(), strict=True):
        assert b.dtype == e.dtype, name
        if b.is_floating_point() and name != "psi_window":
            assert_close(b, e, torch.float32, msg=name)
    for name, p in m.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
