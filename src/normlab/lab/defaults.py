"""Default numbers of a lab run, in a module without torch.

:class:`normlab.lab.train.RunConfig` and :mod:`normlab.lab.sweep` take their defaults
from here, and so does ``normlab sweep``'s argument parser, which must be built without
importing torch (every ``normlab`` command builds it).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BASE_LR",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_EPOCHS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MAX_TRAIN",
]

#: The batch sizes of a sweep.
DEFAULT_BATCH_SIZES = (2, 4, 8, 16, 32)
# 1,200 images × 3 epochs: the 6-norm default grid in under 10 minutes on 2 cores.
# 1,500 × 4 (docs/results/long) took 14 min and was 1-3 points better at batch >= 8.
DEFAULT_EPOCHS = 3
DEFAULT_MAX_TRAIN = 1200
# Measured on the embedded data (one seed, 4 epochs): lowering the base lr from
# 0.1 to 0.00625 cut GN's error at batch 32 from 43.7 % to 23.4 % and BN's from
# 18.0 % to 13.2 %; GN's rise from batch 2 to 32 shrank from 13 to 5 points. With
# the stride-2 stem, 0.003 and 0.025 were no better (3 seeds, batch 2 and 32).
#: Learning rate at batch 32, scaled linearly with the batch.
DEFAULT_BASE_LR = 0.00625
#: Images are resized to this square size.
DEFAULT_IMAGE_SIZE = 16
