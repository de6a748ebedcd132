"""Commands that need no tensors do not import torch; the lazy public API still resolves.

Each import check runs in a fresh interpreter, since this test process has torch loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compare_does_not_import_torch():
    _run(
        "import sys; from normlab.cli import main; "
        "rc = main(['compare', 'a=1,2,3', 'b=2,3,4']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )


def test_help_and_a_user_error_do_not_import_torch():
    _run(
        "import sys; from normlab.cli import main; "
        "assert main([]) == 0; "
        "assert main(['compare', 'a=1,2,3']) == 2; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )


def test_import_normlab_does_not_import_torch():
    _run(
        "import sys, normlab, normlab.lab; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert normlab.__version__"
    )


@pytest.mark.parametrize(
    "code",
    [
        "import normlab; assert normlab.nn.BatchNorm2d; assert normlab.functional.batch_norm",
        "import normlab.nn; from normlab.nn import BatchNorm2d",
        "from normlab import nn, functional, NormShapeError; assert nn.BatchNorm2d",
        "import normlab; assert issubclass(normlab.NormShapeError, ValueError)",
        "from normlab import *; assert nn and functional and NormShapeError",
        "from normlab.lab import RunConfig, SweepInterrupted, ProtocolMismatchError",
        "from normlab.lab import *; assert RunConfig and run_sweep and write_report",
        "import normlab.lab as lab; assert all(getattr(lab, n) for n in lab.__all__)",
    ],
)
def test_public_names_resolve(code):
    _run(code)


def test_unknown_attribute_is_an_attribute_error():
    import normlab
    import normlab.lab

    for module in (normlab, normlab.lab):
        assert not hasattr(module, "no_such_name")


def test_errors_are_one_class_wherever_imported():
    from normlab.lab import DataError, ProtocolMismatchError, StoreError, errors
    from normlab.lab.data import images as data
    from normlab.lab.sweep import store

    assert DataError is data.DataError is errors.DataError
    assert StoreError is store.StoreError is errors.StoreError
    assert ProtocolMismatchError is store.ProtocolMismatchError
    assert issubclass(ProtocolMismatchError, StoreError)


def test_run_config_defaults_match_the_sweep_parser():
    from normlab.cli import build_parser
    from normlab.lab import RunConfig
    from normlab.lab.sweep.orchestrate import DEFAULT_BATCH_SIZES

    args = build_parser().parse_args(["sweep"])
    assert args.epochs == RunConfig.epochs
    assert args.lr == RunConfig.base_lr
    assert args.image_size == RunConfig.image_size
    assert args.max_train == RunConfig.max_train
    assert args.batch_sizes == list(DEFAULT_BATCH_SIZES)
