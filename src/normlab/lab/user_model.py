"""``normlab.lab.user_model``: the path earlier releases and ``examples/my_model.py`` import
``build_user_model`` / ``load_factory`` from. The code lives in
:mod:`normlab.lab.models.user_model`; ``normlab.lab`` exports the same names."""

from __future__ import annotations

from .models.user_model import (
    ConversionSummary,
    ModelFactoryError,
    UserFactory,
    build_user_model,
    load_factory,
)

__all__ = [
    "ConversionSummary",
    "ModelFactoryError",
    "UserFactory",
    "build_user_model",
    "load_factory",
]
