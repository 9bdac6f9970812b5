"""COCO box / mask evaluation of torchvision detector outputs, across ranks, with pycocotools.

Why pycocotools itself and not a re-implementation (or faster-coco-eval): published COCO numbers
are pycocotools numbers; a fast clone that differs in the third decimal makes results
incomparable. The cost is that COCOeval runs on one process: every rank converts its
predictions to COCO results (boxes to xywh, labels to category ids, masks to RLE) locally, rank 0
gathers them, evaluates, writes the files and broadcasts the metrics, so every rank returns the
same dict (and can log or early-stop consistently).

Files written by :meth:`CocoEvaluator.evaluate` when given ``out_dir`` (rank 0 only):
``results_<iou>.json`` (COCO results format), ``metrics_<iou>.txt`` (the 12-line summary) and
``metrics.json`` (the returned dict).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["IOU_TYPES", "METRIC_NAMES", "CocoEvaluator", "format_coco_summary"]

IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
#: Names of COCOeval's 12 ``stats``, in order.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# (is AP, IoU threshold or None for 0.50:0.95, area range, max detections) of each summary line,
# as pycocotools' COCOeval.summarize() prints them.
_SUMMARY_ROWS = (
    (True, None, "all", 100),
    (True, 0.5, "all", 100),
    (True, 0.75, "all", 100),
    (True, None, "small", 100),
    (True, None, "medium", 100),
    (True, None, "large", 100),
    (False, None, "all", 1),
    (False, None, "all", 10),
    (False, None, "all", 100),
    (False, None, "small", 100),
    (False, None, "medium", 100),
    (False, None, "large", 100),
)


def format_coco_summary(metrics: Mapping[str, float]) -> str:
    """The 12-line table ``COCOeval.summarize()`` prints, from one iou type's metrics dict."""
    lines = []
    for name, (is_ap, iou, area, max_dets) in zip(METRIC_NAMES, _SUMMARY_ROWS):
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        iou_str = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] "
            f"= {metrics[name]:0.3f}"
        )
    return "\n".join(lines)


class CocoEvaluator:
    """Accumulates detector outputs for a COCO ground truth and computes COCO metrics.

    Args:
        coco_gt: the ground truth, a pycocotools ``COCO`` (e.g. ``CocoDetection.coco``) or the
            path of an instances json.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")`` (``"segm"`` needs ``masks`` outputs).
        contiguous_to_category_id: the dataset's label -> COCO category id mapping
            (``CocoDetection.contiguous_to_category_id``); ``None`` means labels are category ids.
        mask_threshold: mask probabilities above it count as foreground (torchvision: 0.5).

    Use: ``update()`` after every batch on every rank, then ``evaluate()`` once on every rank
    (it is a collective when a process group is initialized). ``evaluate()`` consumes the
    accumulated predictions, so the same evaluator can serve the next evaluation.
    """

    def __init__(
        self,
        coco_gt: COCO | str | os.PathLike,
        iou_types: Sequence[str] = ("bbox",),
        contiguous_to_category_id: Mapping[int, int] | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        if isinstance(coco_gt, (str, os.PathLike)):
            if not Path(coco_gt).is_file():
                raise FileNotFoundError(f"COCO annotation file not found: {coco_gt}")
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO(str(coco_gt))
        unknown = [t for t in iou_types if t not in IOU_TYPES]
        if unknown or not iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {tuple(iou_types)}")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        self.contiguous_to_category_id = dict(contiguous_to_category_id) if contiguous_to_category_id else None
        self.mask_threshold = mask_threshold
        #: COCOeval objects of the last evaluate() on rank 0 (per-category precision lives there).
        self.coco_evals: dict[str, COCOeval] = {}
        self._results: dict[int, list[dict[str, Any]]] = {}

    def reset(self) -> None:
        """Forget the predictions accumulated so far."""
        self._results = {}

    def update(
        self, predictions: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int | torch.Tensor]
    ) -> None:
        """Add one batch of torchvision outputs (``boxes`` XYXY, ``scores``, ``labels``, ``masks``).

        An image id seen before (e.g. a padded duplicate from ``even_eval_batches``) is ignored.
        An image with zero detections still counts: its ground truth becomes misses.
        """
        if len(predictions) != len(image_ids):
            raise ValueError(f"got {len(predictions)} predictions for {len(image_ids)} image ids")
        for prediction, image_id in zip(predictions, image_ids):
            image_id = int(image_id)
            if image_id in self._results:
                continue
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            self._results[image_id] = self._convert(prediction, image_id)

    def _convert(self, prediction: Mapping[str, torch.Tensor], image_id: int) -> list[dict[str, Any]]:
        boxes = prediction["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        boxes[:, 2:] -= boxes[:, :2]
        scores = prediction["scores"].detach().cpu().tolist()
        labels = prediction["labels"].detach().cpu().tolist()
        if self.contiguous_to_category_id is not None:
            missing = sorted({label for label in labels if label not in self.contiguous_to_category_id})
            if missing:
                raise ValueError(f"labels {missing} of image {image_id} are not in contiguous_to_category_id")
            labels = [self.contiguous_to_category_id[label] for label in labels]
        results = [
            {"image_id": image_id, "category_id": int(c), "bbox": [float(v) for v in box], "score": float(s)}
            for box, c, s in zip(boxes.tolist(), labels, scores)
        ]
        if "segm" in self.iou_types:
            for result, rle in zip(results, self._encode_masks(prediction, image_id, len(results))):
                result["segmentation"] = rle
        return results

    def _encode_masks(self, prediction: Mapping[str, torch.Tensor], image_id: int, count: int) -> list[dict[str, Any]]:
        if "masks" not in prediction:
            raise ValueError(f"iou type 'segm' needs 'masks' in the predictions (image {image_id})")
        masks = prediction["masks"].detach().cpu()
        if masks.dim() == 4:  # N x 1 x H x W probabilities from torchvision
            masks = masks[:, 0]
        info = self.coco_gt.imgs[image_id]
        if masks.shape[0] != count or tuple(masks.shape[1:]) != (info["height"], info["width"]):
            raise ValueError(
                f"masks of image {image_id} have shape {tuple(masks.shape)}, expected "
                f"({count}, {info['height']}, {info['width']}) (N x H x W at the original image size)"
            )
        if count == 0:
            return []
        binary = masks > self.mask_threshold if masks.is_floating_point() else masks.bool()
        fortran = np.asfortranarray(binary.permute(1, 2, 0).numpy().astype(np.uint8))
        rles = mask_utils.encode(fortran)
        return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]

    def evaluate(self, out_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
        """Gather all ranks' predictions, run COCOeval on rank 0, return metrics on every rank.

        Returns ``{iou_type: {"AP": .., "AP50": .., ..., "ARl": ..}}`` (:data:`METRIC_NAMES`, in
        [0, 1]; -1 where the ground truth has no object of that size, as pycocotools reports),
        identical on all ranks. With no prediction at all, every metric is 0 and a warning says
        so. Writes the files listed in the module docstring under ``out_dir`` (rank 0).
        """
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        results = self._results
        self._results = {}
        if distributed:
            parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(results, parts, dst=0)
            if dist.get_rank() != 0:
                box = [None]
                dist.broadcast_object_list(box, src=0)
                return _unwrap(box[0])
            results = {}
            for part in parts or []:
                for image_id, dets in part.items():
                    results.setdefault(image_id, dets)  # first occurrence wins: drops padded duplicates
        try:
            outcome: Any = ("ok", self._evaluate_rank0(results, out_dir))
        except Exception as exc:  # tell the other ranks instead of leaving them in the broadcast
            outcome = ("error", f"{type(exc).__name__}: {exc}")
            if not distributed:
                raise
        if distributed:
            dist.broadcast_object_list([outcome], src=0)
        return _unwrap(outcome)

    def _evaluate_rank0(
        self, results: dict[int, list[dict[str, Any]]], out_dir: str | os.PathLike | None
    ) -> dict[str, dict[str, float]]:
        image_ids = sorted(results)
        out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, dict[str, float]] = {}
        self.coco_evals = {}
        for iou_type in self.iou_types:
            detections = [_as_result(r, iou_type) for i in image_ids for r in results[i]]
            if out is not None:
                (out / f"results_{iou_type}.json").write_text(json.dumps(detections))
            if not detections:
                warnings.warn(
                    f"COCO {iou_type} evaluation: no predictions for {len(image_ids)} image(s); "
                    "all metrics are 0",
                    stacklevel=3,
                )
                stats = [0.0] * len(METRIC_NAMES)
            else:
                with contextlib.redirect_stdout(io.StringIO()):
                    coco_dt = self.coco_gt.loadRes(detections)
                    coco_eval = COCOeval(self.coco_gt, coco_dt, iou_type)
                    coco_eval.params.imgIds = image_ids
                    coco_eval.evaluate()
                    coco_eval.accumulate()
                    coco_eval.summarize()
                self.coco_evals[iou_type] = coco_eval
                stats = [float(s) for s in coco_eval.stats]
            metrics[iou_type] = dict(zip(METRIC_NAMES, stats))
            if out is not None:
                (out / f"metrics_{iou_type}.txt").write_text(format_coco_summary(metrics[iou_type]) + "\n")
        if out is not None:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def _as_result(result: dict[str, Any], iou_type: str) -> dict[str, Any]:
    """One COCO result dict for ``iou_type`` (a fresh dict: ``loadRes`` writes into it).

    Segm results carry no ``bbox`` so that ``loadRes`` takes the mask area for COCO's size ranges.
    """
    keep = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    return {k: result[k] for k in keep}


def _unwrap(outcome: Any) -> dict[str, dict[str, float]]:
    status, value = outcome
    if status == "error":
        raise RuntimeError(f"COCO evaluation failed on rank 0: {value}")
    return value
