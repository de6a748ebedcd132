"""Adapters for the training frameworks users already train with.

Each module imports its framework at import time and is installed with its extra:
``normlab.integrations.lightning`` (``pip install normlab[lightning]``: a ``LayerSync``
plugin, the ``PreciseBN`` and ``Doctor`` callbacks) and ``normlab.integrations.mmengine``
(``pip install normlab[mmengine]``: normlab's layers in mmengine's ``MODELS`` registry,
a precise-BN hook). The names other libraries give norms (detectron2, timm, MONAI) need
no framework and live in :mod:`normlab.registry` (``create_norm("SyncBN", 64)``).
Importing this package imports no framework.
"""
