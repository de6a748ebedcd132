"""ONNX export (opset 18) in eval mode, run with onnxruntime, compared with PyTorch."""

from __future__ import annotations

import collections

import pytest
import torch
from _eco_cases import BY_NAME, CASES, make_input
from torch import nn

import normlab.nn as nnl

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it

pytestmark = [
    # torch's exporter goes through torch.export / dynamo, which warns from torch's
    # own internals (autograd.Function instantiation, TorchScript helpers).
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class Bundle(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer, x in zip(self.layers, inputs, strict=True))


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...]):
    program = torch.onnx.export(model, inputs, dynamo=True, opset_version=18, verbose=False)
    return program.model_proto


def _run(proto, inputs):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(y) for y in sess.run(None, feed)]


def _check(expected: torch.Tensor, actual: torch.Tensor, name: str) -> None:
    # 1e-5 relative to the output's scale (a conv output of magnitude ~30 sums in a
    # different order in onnxruntime).
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_every_layer_exports_and_matches():
    """All layers of the case table in eval mode, exported as one model (one export)."""
    model = Bundle([case.build() for case in CASES]).eval()
    inputs = tuple(make_input(case) for case in CASES)
    proto = _export(model, inputs)
    onnx.checker.check_model(proto)
    with torch.no_grad():
        expected = model(*inputs)
    for case, e, a in zip(CASES, expected, _run(proto, inputs), strict=True):
        _check(e, a, case.name)


def _op_types(module: nn.Module, x: torch.Tensor) -> collections.Counter:
    proto = _export(module.eval(), (x,))
    with torch.no_grad():
        _check(module(x), _run(proto, (x,))[0], type(module).__name__)
    return collections.Counter(node.op_type for node in proto.graph.node)


@pytest.mark.parametrize("name", ["FrozenBatchNorm2d", "BatchNorm2d"])
def test_eval_batchnorm_exports_as_plain_affine(name):
    case = BY_NAME[name]
    ops = _op_types(case.build(), make_input(case))
    assert set(ops) <= {"Sub", "Mul", "Add", "BatchNormalization"}, ops
    assert sum(ops.values()) <= 4, ops


def test_group_norm_graph_is_small():
    case = BY_NAME["GroupNorm"]
    ops = _op_types(case.build(), make_input(case))
    assert ops["InstanceNormalization"] + ops["GroupNormalization"] == 1, ops
    assert sum(ops.values()) <= 16, ops


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nnl.WSConv2d(3, 8, 3, padding=1),
            nnl.GroupNorm(4, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nnl.BatchNorm2d(8),
            nn.ReLU(),
            nnl.CenteredConv2d(8, 8, 3, padding=1, bias=False),
            nnl.FrozenBatchNorm2d(8),
            nnl.FilterResponseNorm2d(8),
        )
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_small_cnn_exports_and_matches():
    from normlab.selfcheck import randomize

    model = randomize(SmallCNN()).eval()
    x = make_input(BY_NAME["BatchNorm2d"]).new_empty(2, 3, 9, 7).normal_()
    proto = _export(model, (x,))
    with torch.no_grad():
        _check(model(x), _run(proto, (x,))[0], "SmallCNN")
