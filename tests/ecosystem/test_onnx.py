"""ONNX export (opset 18) in eval mode with both of torch's exporters, run in onnxruntime.

``dynamo=False`` is the TorchScript-based exporter (what many deployment stacks
still call), with its default constant folding; ``dynamo=True`` the
``torch.export``-based one. Every layer of the case table is exported alone and
stacked after convolutions (conv → layer → conv → a copy of the layer), with
random parameters and freshly initialized. Copies and fresh layers hold equal
parameter values (a fresh BatchNorm's weight equals its running_var), which the
TorchScript exporter deduplicates into ``Identity`` nodes: the graph shape that
onnxruntime's optimizer used to break (see ``normlab._core.export``). Each
file is loaded by onnxruntime with its default optimizations and compared with
PyTorch on another off-center input than the one it was traced with.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import warnings

import pytest
import torch
from _eco_cases import BY_NAME, CASES, EcoCase, make_input
from torch import nn

import normlab.nn as nnl
from normlab.catalogue import randomize

onnx = pytest.importorskip("onnx")
numpy_helper = pytest.importorskip("onnx.numpy_helper")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it

# torch.export's pytree helpers warn about their own deprecated API.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`:FutureWarning")

EXPORTERS = ("legacy", "dynamo")


@contextlib.contextmanager
def _legacy_warnings():
    """The warnings the TorchScript exporter is expected to give on these layers."""
    with warnings.catch_warnings():
        # torch deprecates this exporter (and a helper it calls).
        warnings.filterwarnings("ignore", "You are using the legacy", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        # Shape checks (``x.shape[1] != num_features``) read traced sizes: the file
        # is for the traced shape, which is what a fixed-shape export is.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Layers that normalize with the input's own statistics in eval mode
        # (InstanceNorm, GroupNorm, untracked BatchNorm) call instance_norm /
        # batch_norm with training=True.
        warnings.filterwarnings("ignore", "ONNX export mode is set to TrainingMode.EVAL")
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        yield


def _export(model: nn.Module, inputs: tuple[torch.Tensor, ...], exporter: str):
    if exporter == "dynamo":
        program = torch.onnx.export(model, inputs, dynamo=True, opset_version=18, verbose=False)
        return program.model_proto
    f = io.BytesIO()
    with _legacy_warnings():
        torch.onnx.export(model, inputs, f, dynamo=False, opset_version=18)
    return onnx.load_from_string(f.getvalue())


def _run(proto, inputs):
    # Default session options: the graph optimizer runs, as in deployment.
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(y) for y in sess.run(None, feed)]


def _check(expected: torch.Tensor, actual: torch.Tensor, name: str) -> None:
    # 1e-5 relative to the output's scale (a conv output of magnitude ~30 sums in a
    # different order in onnxruntime).
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=name)


def _reciprocal_divs(proto) -> list[str]:
    """``Div`` nodes whose numerator is a constant of ones.

    onnxruntime rewrites ``Mul(Div(1, a), b)`` into ``Div(b, a)`` (DivMulFusion);
    where ``b`` is an ``Identity`` of an initializer, its identity elimination then
    leaves the new node reading a removed name and the file does not load.
    """
    ones = {i.name for i in proto.graph.initializer if (numpy_helper.to_array(i) == 1).all()}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            if (numpy_helper.to_array(n.attribute[0].t) == 1).all():
                ones.add(n.output[0])
    return [n.name for n in proto.graph.node if n.op_type == "Div" and n.input[0] in ones]


def _export_and_compare(model: nn.Module, cases: list[EcoCase], exporter: str):
    """Export with one input per case, run another one in onnxruntime; the proto."""
    model.eval()
    proto = _export(model, tuple(make_input(c) for c in cases), exporter)
    onnx.checker.check_model(proto)
    assert not _reciprocal_divs(proto), _reciprocal_divs(proto)
    inputs = tuple(make_input(c, seed=5) for c in cases)
    with torch.no_grad():
        expected = model(*inputs)
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    for case, e, a in zip(cases, expected, _run(proto, inputs), strict=True):
        _check(e, a, f"{case.name} ({exporter})")
    return proto


class Bundle(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer, x in zip(self.layers, inputs, strict=True))


def _fresh(layer: nn.Module) -> nn.Module:
    """``layer`` back to its default initialization (weights 1, biases 0, var 1, ...)."""
    for m in layer.modules():
        for reset in ("reset_running_stats", "reset_parameters"):
            if hasattr(m, reset):
                getattr(m, reset)()
    return layer


def _mixer(x: torch.Tensor, c_in: int, c_out: int, seed: int) -> nn.Module:
    """A conv (Linear for (N, C) input) with off-center output."""
    torch.manual_seed(seed)
    if x.dim() == 2:
        m = nn.Linear(c_in, c_out)
    else:
        m = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[x.dim() - 3](c_in, c_out, 3, padding=1)
    with torch.no_grad():
        m.bias.add_(3.0)
    return m


def _stacked(case: EcoCase, init: str) -> nn.Module:
    """conv → layer → conv → copy of the layer (equal parameter values)."""
    layer = case.build().eval()
    if init == "fresh":
        layer = _fresh(layer)
    x = make_input(case)
    c = x.shape[1]
    with torch.no_grad():
        c_mid = layer(x).shape[1]
    return nn.Sequential(
        _mixer(x, c, c, seed=1), layer, _mixer(x, c_mid, c, seed=2), copy.deepcopy(layer)
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_legacy_exporter_alone_and_stacked(case):
    """TorchScript exporter, one file per layer and configuration."""
    _export_and_compare(case.build(), [case], "legacy")
    for init in ("random", "fresh"):
        _export_and_compare(_stacked(case, init), [case], "legacy")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_every_layer_in_one_model(exporter):
    """All layers side by side in one model (one export): equal values across layers."""
    _export_and_compare(Bundle([case.build() for case in CASES]), CASES, exporter)


@pytest.mark.parametrize("init", ["random", "fresh"])
def test_dynamo_exporter_stacked(init):
    """torch.export-based exporter, every stacked configuration in one model."""
    _export_and_compare(Bundle([_stacked(case, init) for case in CASES]), CASES, "dynamo")


def _op_types(proto) -> collections.Counter:
    """Node types but ``Constant`` and ``Identity``: the TorchScript exporter writes
    scalars as nodes, and parameters equal to another one as an alias of it."""
    skip = ("Constant", "Identity")
    return collections.Counter(n.op_type for n in proto.graph.node if n.op_type not in skip)


BATCH_NORM_LIKE = [
    *(f"{kind}{r}d" for kind in ("BatchNorm", "FrozenBatchNorm", "BatchRenorm") for r in (1, 2, 3)),
    "BatchNorm2d-momentumNone",
    "BatchNorm1d-2d-input",
    "InstanceNorm2d-tracked",
]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_eval_batchnorm_exports_as_batch_normalization(exporter):
    """Normalization with running statistics is one BatchNormalization node per layer."""
    cases = [BY_NAME[name] for name in BATCH_NORM_LIKE]
    ops = _op_types(_export_and_compare(Bundle([c.build() for c in cases]), cases, exporter))
    assert ops == {"BatchNormalization": len(cases)}, ops


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_conv_batchnorm_graph(exporter):
    """conv → BatchNorm → conv → FrozenBatchNorm → FrozenBatchNorm: no arithmetic nodes.

    The TorchScript exporter folds an eval BatchNormalization into the conv before
    it; the other one keeps it (onnxruntime folds it when it loads the file).
    """
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        randomize(nnl.BatchNorm2d(6)),
        nn.Conv2d(6, 6, 3, padding=1),
        randomize(nnl.FrozenBatchNorm2d(6)),
        nnl.FrozenBatchNorm2d(6),
    )
    case = EcoCase("conv-bn", nnl.BatchNorm2d, lambda: model, (2, 3, 7, 5))
    ops = _op_types(_export_and_compare(model, [case], exporter))
    assert set(ops) <= {"Conv", "BatchNormalization"}, ops
    assert ops["Conv"] == 2, ops


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_group_norm_graph_is_small(exporter):
    case = BY_NAME["GroupNorm"]
    ops = _op_types(_export_and_compare(case.build(), [case], exporter))
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


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_small_cnn_exports_and_matches(exporter):
    model = randomize(SmallCNN())
    case = EcoCase("SmallCNN", SmallCNN, SmallCNN, (2, 3, 9, 7))
    _export_and_compare(model, [case], exporter)


def test_auto_backend_is_torch_under_onnx_export(monkeypatch):
    """A CUDA input under export takes the torch path: ONNX has no Triton ops (even with
    the kernels switched on by NORMLAB_TRITON=1)."""
    from normlab._core import dispatch
    from normlab._core.dispatch import resolve_backend

    cuda_x = torch.randn(2, 4, 3, 3)  # taken for a CUDA tensor on a tested GPU below
    monkeypatch.setattr(dispatch, "_is_cuda", lambda x: True)
    monkeypatch.setattr(dispatch, "available", lambda: True)
    monkeypatch.setattr(dispatch, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(dispatch, "_rocm", lambda: False)
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 8))
    monkeypatch.setenv("NORMLAB_TRITON", "1")
    assert resolve_backend("frozen_batch_norm", "auto", cuda_x) == "triton"
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    for op in ("frozen_batch_norm", "batch_norm_eval", "group_norm", "filter_response_norm"):
        assert resolve_backend(op, "auto", cuda_x) == "torch", op


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.trace.* is deprecated:DeprecationWarning")
# The exporter cannot read a ScriptModule's signature (nothing to map: one input).
@pytest.mark.filterwarnings("ignore:no signature found for:UserWarning")
def test_jit_traced_module_exports_with_the_legacy_exporter():
    """A ``torch.jit.trace`` made before the export records the export-safe ops too."""
    model = nn.Sequential(
        nn.Conv2d(6, 6, 3, padding=1),
        nnl.FrozenBatchNorm2d(6),
        nnl.FrozenBatchNorm2d(6),
        nnl.FilterResponseNorm2d(6),
        nnl.LocalResponseNorm(3),
    ).eval()
    case = BY_NAME["FrozenBatchNorm2d"]
    with _legacy_warnings():
        traced = torch.jit.trace(model, (make_input(case),))
    _export_and_compare(traced, [case], "legacy")
