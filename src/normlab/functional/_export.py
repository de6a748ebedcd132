"""What the functional ops emit while ``torch.onnx.export`` traces them.

ONNX export (the TorchScript-based ``dynamo=False`` exporter and the
``torch.export``-based ``dynamo=True`` one) is detected with
:func:`onnx_exporting`, and two graph shapes change there:

* Eval-mode BatchNorm and FrozenBatchNorm call :func:`torch.nn.functional.batch_norm`
  with the running statistics, which both exporters write as one ONNX
  ``BatchNormalization`` node. Runtimes fold that node into a preceding ``Conv``
  and run it as a fused per-channel affine; it is the standard form deployment
  tools look for. In eager mode normlab computes ``(x − μ)·γ/σ + β`` instead
  (accurate on off-center data, see :mod:`normlab.functional._normalize`).
* :func:`rsqrt` is ``1/sqrt`` as ``Reciprocal(Sqrt(x))``. The TorchScript
  exporter writes ``torch.rsqrt`` as ``Div(1, Sqrt(x))``; when that ``Div`` feeds a
  ``Mul`` whose other input is an ``Identity`` of an initializer (which the same
  exporter inserts when two parameters or buffers hold equal values, e.g. a fresh
  BatchNorm's weight and running_var, or two copies of one layer), onnxruntime's
  graph optimizer (``DivMulFusion`` together with ``EliminateIdentity``) leaves a
  node reading a removed name and refuses to load the file. ``Reciprocal`` does not
  start that rewrite.

Neither applies under ``torch.compile`` (which never exports to ONNX) or in
eager mode, so training and eager numerics are unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["onnx_exporting", "rsqrt"]


def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is tracing this call."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return False
    return torch.onnx.is_in_onnx_export()


def rsqrt(x: Tensor) -> Tensor:
    """``1 / sqrt(x)``: ``torch.rsqrt`` normally, ``Reciprocal(Sqrt(x))`` under export."""
    if onnx_exporting():
        return torch.reciprocal(torch.sqrt(x))
    return torch.rsqrt(x)
