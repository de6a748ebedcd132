"""``torch.compile(fullgraph=True)`` matches eager: outputs, gradients, buffer updates.

Compiling is slow on a small CPU machine, so every layer of the case table is
wrapped into one module (a ModuleList applied to separate inputs in a single
forward) and that module is compiled once per mode. ``fullgraph=True`` makes a
graph break an error; three training steps with one compiled graph show that
no buffer value (``num_batches_tracked``, the MABN windows) is guarded on.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from _eco_cases import BY_NAME, CASES, make_input
from torch import nn
from torch._dynamo.utils import counters

from _testing import assert_close

pytestmark = [
    pytest.mark.slow,
    # Raised inside torch's own dynamo tracing of autograd.Function (MABN), not by normlab.
    pytest.mark.filterwarnings(
        "ignore:.*autograd.function.Function'> should not be instantiated:DeprecationWarning"
    ),
    # Raised when inductor imports torch's own TorchScript helpers (mkldnn), not by normlab.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


class Bundle(nn.Module):
    """Every case's layer, each applied to its own input."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, inputs, strict=True)]


def _step(model, xs, gs):
    xs = [x.clone().requires_grad_() for x in xs]
    ys = model(xs)
    sum((y * g).sum() for y, g in zip(ys, gs, strict=True)).backward()
    return [y.detach() for y in ys], [x.grad for x in xs]


def _run(cases, train: bool, steps: int, backend: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    eager = Bundle([case.build() for case in cases]).train(train)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    for step in range(steps):
        xs = [make_input(case, seed=step) for case in cases]
        with torch.no_grad():
            shapes = [y.shape for y in copy.deepcopy(eager)(xs)]
        g = torch.Generator().manual_seed(100 + step)
        gs = [torch.randn(s, generator=g) for s in shapes]
        ys_c, dx_c = _step(compiled, xs, gs)
        ys_e, dx_e = _step(eager, xs, gs)
        for case, ye, yc, de, dc in zip(cases, ys_e, ys_c, dx_e, dx_c, strict=True):
            assert_close(yc, ye, torch.float32, msg=f"{case.name}: output, step {step}")
            assert_close(dc, de, torch.float32, msg=f"{case.name}: input grad, step {step}")
        for (name, pe), pc in zip(eager.named_parameters(), twin.parameters(), strict=True):
            assert (pe.grad is None) == (pc.grad is None), name
            if pe.grad is not None:
                assert_close(pc.grad, pe.grad, torch.float32, msg=f"{name}.grad, step {step}")
        for (name, be), bc in zip(eager.named_buffers(), twin.buffers(), strict=True):
            if be.is_floating_point():
                assert_close(bc, be, torch.float32, msg=f"buffer {name}, step {step}")
            else:
                assert torch.equal(bc, be), f"buffer {name}, step {step}"
        eager.zero_grad()
        twin.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# "aot_eager_decomp_partition" runs everything torch.compile does before code
# generation: dynamo (fullgraph), AOTAutograd's functionalization of the buffer
# updates, inductor's decompositions and its min-cut partitioner (which decides
# what backward recomputes). Inductor's C++ code generation of the whole table
# takes minutes on a 2-core machine, so it gets the layers whose training forward
# reads buffers that it then updates in place (see normlab.functional.batch_norm.snapshot).
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_matches_eager(train):
    # 3 steps: MABN leaves warm-up at step 1; momentum=None factors are 1, 1/2, 1/3.
    _run(CASES, train=train, steps=3 if train else 1, backend="aot_eager_decomp_partition")


INDUCTOR_CASES = [
    BY_NAME[name]
    for name in (
        "BatchNorm2d-momentumNone",
        "BatchRenorm2d",
        "MovingAverageBatchNorm2d",
    )
]


def test_inductor_train_stateful_layers():
    _run(INDUCTOR_CASES, train=True, steps=3, backend="inductor")
