"""What the functional ops emit while a graph of them is recorded for a file.

Two graph shapes change there; eager mode and ``torch.compile`` are untouched, so
training and eager numerics are unchanged.

* Under ONNX export (:func:`onnx_exporting`: the TorchScript-based ``dynamo=False``
  exporter and the ``torch.export``-based ``dynamo=True`` one), normalization with
  running statistics (eval BatchNorm, FrozenBatchNorm, BatchRenorm, tracked
  InstanceNorm) calls :func:`torch.nn.functional.batch_norm`, which both exporters
  write as one ONNX ``BatchNormalization`` node: the standard op, which runtimes
  fold into a preceding ``Conv``. In eager mode normlab computes
  ``(x − μ)·γ/σ + β`` instead, accurate on off-center data (see
  :mod:`normlab._core.normalize`); a ``torch.jit.trace`` keeps that formula,
  as it runs in PyTorch.
* While a graph is recorded (:func:`recording`: ONNX export, or a
  ``torch.jit.trace`` that may be exported later), :func:`rsqrt` is written as
  ``Reciprocal(Sqrt(x))``. The TorchScript exporter writes ``torch.rsqrt`` as
  ``Div(1, Sqrt(x))``, and a parameter or buffer equal to another one (a fresh
  BatchNorm's weight and running_var; two copies of a layer) as an ``Identity`` of
  that initializer. onnxruntime rewrites ``Mul(Div(1, a), b)`` into ``Div(b, a)``
  (``DivMulFusion``) and removes ``Identity`` nodes (``EliminateIdentity``); where
  ``b`` is such an ``Identity``, the two leave a node reading a removed name, and
  the session refuses the file. ``Reciprocal`` starts no such rewrite.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["onnx_exporting", "recording", "rsqrt"]


def onnx_exporting() -> bool:
    """Whether ``torch.onnx.export`` (either exporter) is tracing this call."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return False
    return torch.onnx.is_in_onnx_export()


def recording() -> bool:
    """Whether ``torch.onnx.export`` or ``torch.jit.trace`` is recording this call."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return False
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def rsqrt(x: Tensor) -> Tensor:
    """``1 / sqrt(x)``: ``torch.rsqrt``, or ``Reciprocal(Sqrt(x))`` while :func:`recording`."""
    if recording():
        return torch.reciprocal(torch.sqrt(x))
    return torch.rsqrt(x)
