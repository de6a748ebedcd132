"""COCO AP of gathered detections, computed by pycocotools (the reference implementation).

:func:`coco_ap` takes, per image, its detections ``(k, 6)`` rows ``[score, class, x1, y1,
x2, y2]`` and its ground truth ``(m, 5)`` rows ``[class, x1, y1, x2, y2]`` (rows of class
< 0 are padding and skipped), builds the two COCO objects in memory (image ids 1 … N,
category ids 1 … K) and runs ``COCOeval`` with its defaults (IoU thresholds 0.50:0.05:0.95,
101-point interpolated precision, up to 100 detections per image, all areas). It returns
AP@[.5:.95], AP50 and AP75 in %. An image without ground truth still counts: its
detections are false positives. A set without any ground-truth box has no AP (NaN).
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np

__all__ = ["coco_ap"]


def coco_ap(
    detections: list[np.ndarray], targets: list[np.ndarray], num_classes: int
) -> dict[str, float]:
    """``{"ap", "ap50", "ap75"}`` in % of the detections against the targets (module doc)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} images of detections but {len(targets)} of targets")
    annotations = []
    for i, rows in enumerate(targets):
        for c, x1, y1, x2, y2 in np.asarray(rows, dtype=np.float64).reshape(-1, 5).tolist():
            if c < 0:
                continue
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    if not annotations:
        return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan}
    results = [
        [i + 1, x1, y1, x2 - x1, y2 - y1, score, int(c) + 1]
        for i, rows in enumerate(detections)
        for score, c, x1, y1, x2, y2 in np.asarray(rows, dtype=np.float64).reshape(-1, 6).tolist()
        if c >= 0
    ]
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i + 1} for i in range(len(targets))],
            "annotations": annotations,
            "categories": [{"id": k + 1} for k in range(num_classes)],
        }
        gt.createIndex()
        dt = gt.loadRes(np.asarray(results, dtype=np.float64))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50, ap75 = (max(0.0, float(v)) * 100.0 for v in ev.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75}
