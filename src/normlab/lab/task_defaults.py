"""What a lab run learns, by name, and each task's sweep defaults, in a module without torch.

``normlab sweep --task NAME`` builds its parser from here without importing torch (every
``normlab`` command builds it); :class:`normlab.lab.run_config.RunConfig` checks its
``task`` against :data:`TASKS`.

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

__all__ = ["CLASSIFICATION_TASK", "SEGMENTATION_DEFAULTS", "SEGMENTATION_TASK", "TASKS"]

#: Image classification (cross-entropy, top-1 error): the lab's ResNet on Animal-MNIST.
CLASSIFICATION_TASK = "classification"
#: Semantic segmentation (per-pixel cross-entropy, mean IoU and pixel error): a U-Net on
#: the built-in silhouette scenes (:mod:`normlab.lab.seg_data`).
SEGMENTATION_TASK = "segmentation"
#: Every task a run may have.
TASKS = (CLASSIFICATION_TASK, SEGMENTATION_TASK)


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
    #: Channels of the U-Net's levels (:func:`normlab.lab.seg_models.build_segmentation_model`).
    widths: tuple[int, ...] = (16, 32, 64)


#: The defaults of ``normlab sweep --task segmentation``.
SEGMENTATION_DEFAULTS = SegmentationDefaults()
