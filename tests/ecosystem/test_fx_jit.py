"""torch.fx, TorchScript and torch.export: what each layer's design allows.

* ``torch.fx.symbolic_trace`` cannot trace normlab layers: their forward
  validates the input with Python control flow on its shape (``x.dim()``,
  ``x.shape[1]``), which a symbolic Proxy cannot answer. The dynamo-based
  tracers can: ``torch.export`` (tested here) gives an FX graph of every layer.
* ``torch.jit.script`` is not supported (f-strings, ``NamedTuple`` statistics,
  ``*args`` helpers, keyword-only arguments); TorchScript is deprecated, and the
  code base is not contorted for it. ``torch.jit.trace`` works in eval mode.
"""

from __future__ import annotations

import pytest
import torch
from _eco_cases import CASES, make_input

from _testing import assert_close

pytestmark = [
    # TorchScript warns that it is deprecated (torch's own warning, not normlab's).
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_jit_trace_eval(case):
    m = case.build().eval()
    x = make_input(case)
    traced = torch.jit.trace(m, (x,), check_trace=False)
    x2 = make_input(case, seed=5)
    assert_close(traced(x2), m(x2), torch.float32)


def test_jit_script_is_unsupported():
    case = CASES[0]
    with pytest.raises(Exception):  # noqa: B017 - torch raises several types here
        torch.jit.script(case.build())


def test_fx_symbolic_trace_is_unsupported():
    case = next(c for c in CASES if c.name == "GroupNorm")
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(case.build())


@pytest.mark.slow
def test_torch_export_gives_an_fx_graph_of_every_layer():
    for case in CASES:
        m = case.build().eval()
        x = make_input(case)
        ep = torch.export.export(m, (x,))
        assert isinstance(ep.graph_module, torch.fx.GraphModule)
        x2 = make_input(case, seed=5)
        assert_close(ep.module()(x2), m(x2), torch.float32, msg=case.name)
