"""Default settings of a lab run and of each task's sweep, in a module without torch.

:class:`~normlab.lab.run.config.RunConfig` and :mod:`normlab.lab.sweep` take their defaults from
here, and so does ``normlab sweep``'s argument parser, which must be built without
importing torch (every ``normlab`` command builds it). :data:`TASKS` names what a run
learns; :class:`normlab.lab.run.config.RunConfig` checks its ``task`` against it.

The segmentation defaults differ from classification's where the task needs it:

* larger images (32 × 32 scenes, so that a U-Net of three levels still has an 8 × 8
  bottom) and 1,200 training scenes, as many as classification's training images (the
  built-in test set is always 500 scenes);
* a higher learning rate, 0.05 × batch / 32 (classification: 0.00625), with the same
  cosine schedule and half an epoch of warm-up: the per-pixel loss is a mean over many
  correlated pixels of few images, which keeps its gradients small;
* BN and GN at batch sizes 2, 4, 8 and 32: the BN-vs-batch-size curve of a dense task
  with the norm that needs batch statistics and one that needs none, within the
  10-minute budget of the default grid on a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLASSIFICATION_TASK",
    "DEFAULT_BASE_LR",
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_EPOCHS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MAX_TRAIN",
    "DETECTION_DEFAULTS",
    "DETECTION_FROZEN",
    "DETECTION_TASK",
    "SEGMENTATION_DEFAULTS",
    "SEGMENTATION_TASK",
    "TASKS",
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

#: Image classification (cross-entropy, top-1 error): the lab's ResNet on Animal-MNIST.
CLASSIFICATION_TASK = "classification"
#: Semantic segmentation (per-pixel cross-entropy, mean IoU and pixel error): a U-Net on
#: the built-in silhouette scenes (:mod:`normlab.lab.data.scenes`).
SEGMENTATION_TASK = "segmentation"
#: Object detection (CenterNet loss, COCO AP by pycocotools): the lab's detector on the
#: built-in detection scenes (:mod:`normlab.lab.data.det_scenes`) or a COCO file.
DETECTION_TASK = "detection"
#: Detection treatments that freeze a pretrained backbone's statistics (meaningless for a
#: backbone trained from scratch; :mod:`normlab.lab.run.pretrain`).
DETECTION_FROZEN = ("frozen_bn", "bn_eval", "bn+recal")
#: Every task a run may have.
TASKS = (CLASSIFICATION_TASK, SEGMENTATION_TASK, DETECTION_TASK)


@dataclass(frozen=True)
class SegmentationDefaults:
    """The sweep settings of ``--task segmentation`` that differ from classification's."""

    epochs: int = 4
    base_lr: float = 0.05
    image_size: int = 32
    #: Training scenes (the built-in test set is always 500 scenes).
    max_train: int = 1200
    batch_sizes: tuple[int, ...] = (2, 4, 8, 32)
    norms: tuple[str, ...] = ("bn", "gn")
    #: Channels of the U-Net's levels (:func:`normlab.lab.models.unet.build_segmentation_model`).
    widths: tuple[int, ...] = (16, 32, 64)


#: The defaults of ``normlab sweep --task segmentation``.
SEGMENTATION_DEFAULTS = SegmentationDefaults()


@dataclass(frozen=True)
class DetectionDefaults:
    """The sweep settings of ``--task detection`` that differ from classification's.

    Sized so that the default grid (4 treatments × 3 batch sizes × 3 seeds, the two
    pretrained backbones included) fits in 10 minutes on a 2-core CPU: 48 × 48 scenes
    (objects of 12-26 pixels on a 12 × 12 output map) and few training scenes.
    """

    epochs: int = 3
    base_lr: float = 0.4
    image_size: int = 48
    #: Training scenes (the built-in test set is always 300 scenes).
    max_train: int = 800
    batch_sizes: tuple[int, ...] = (2, 4, 8)
    norms: tuple[str, ...] = ("bn", "frozen_bn", "bn_eval", "gn")
    #: Channels of the detector's stem and its stride-4 and stride-8 stages.
    widths: tuple[int, ...] = (16, 32, 64)


#: The defaults of ``normlab sweep --task detection``.
DETECTION_DEFAULTS = DetectionDefaults()
