"""Panoptic quality (PQ, SQ, RQ) of segment-id maps, COCO panoptic style, summed across ranks.

The per-image matching is panopticapi's ``pq_compute_single_core``, step for step, so that the
numbers are COCO panoptic numbers:

- a predicted and a ground-truth segment match when they have the same category and
  IoU > 0.5, where the IoU leaves out the predicted pixels that fall on VOID (id 0):
  ``intersection / (pred area + gt area - intersection - pred area on VOID)``;
- unmatched ground-truth segments are false negatives, except crowd ones (``iscrowd == 1``),
  which are never matched nor counted;
- an unmatched predicted segment is a false positive unless more than half of it lies on VOID
  plus the crowd region of its own category.

Per category, the evaluator keeps four sums (true positives, false positives, false negatives,
IoU of the true positives); they add up across images and ranks, so :meth:`evaluate` needs one
all-reduce of a (categories x 4) float64 tensor (counts stay exact well past 2**50).
Ground-truth areas are counted on the given map (panopticapi reads them from the annotation
json, which for COCO holds the same pixel counts).

File written by :meth:`PanopticEvaluator.evaluate` when given ``out_dir`` (rank 0 only):
``panoptic_per_class.json`` (per category PQ, SQ, RQ and the four sums; NaN as ``null``).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from .semantic import _all_reduce_sum, _is_rank0, _json_number

__all__ = ["PanopticEvaluator", "format_panoptic_summary"]

VOID = 0
#: One image's segments: an (H, W) integer map of segment ids and its ``segments_info`` list.
PanopticSegments = tuple[Union[np.ndarray, torch.Tensor], Sequence[Mapping[str, Any]]]
# Columns of the per-category sums.
_TP, _FP, _FN, _IOU = range(4)
_GROUPS = (("All", "", None), ("Things", "_th", True), ("Stuff", "_st", False))


class PanopticEvaluator:
    """Accumulates panopticapi's per-category counts over images, then computes PQ / SQ / RQ.

    Args:
        categories: the data set's panoptic categories (COCO: ``panoptic_val2017.json``'s
            ``categories``), each with ``id``, ``name`` and ``isthing``; predictions and ground
            truth use these ids.

    Use: ``update()`` after every batch on every rank, then ``evaluate()`` once on every rank
    (a collective when a process group is initialized). ``evaluate()`` consumes what was
    accumulated; the summed per-category counts of the last one stay in :attr:`stats`.
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        cats = [dict(c) for c in categories]
        if not cats:
            raise ValueError("categories is empty")
        ids = [int(c["id"]) for c in cats]
        names = [str(c["name"]) for c in cats]
        for what, values in (("ids", ids), ("names", names)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"category {what} must be unique, repeated: {repeated}")
        self.categories: tuple[dict[str, Any], ...] = tuple(cats)
        self.category_names: tuple[str, ...] = tuple(names)
        self.isthing = np.array([int(c.get("isthing", 0)) == 1 for c in cats])
        self._index = {category_id: i for i, category_id in enumerate(ids)}
        #: (categories x 4) all-reduced sums of the last ``evaluate()``: tp, fp, fn, IoU of the tps.
        self.stats: np.ndarray | None = None
        self._stats = np.zeros((len(cats), 4), dtype=np.float64)
        self._seen: set[int] = set()

    def reset(self) -> None:
        """Forget the images accumulated so far."""
        self._stats = np.zeros_like(self._stats)
        self._seen = set()

    def update(
        self,
        predictions: Sequence[PanopticSegments],
        ground_truths: Sequence[PanopticSegments],
        image_ids: Sequence[int | torch.Tensor],
    ) -> None:
        """Add one batch of (segment-id map, segments_info) pairs, predicted and ground truth.

        Prediction ``segments_info`` entries need ``id`` and ``category_id``; ground-truth ones
        also ``iscrowd`` (absent means 0). Id 0 is VOID in both maps. Every id in a predicted map
        but VOID must be listed, and every listed id must be in the map (panopticapi's checks).
        An image id seen before (a padded repeat of the evaluation sampler) is skipped.
        """
        if not len(predictions) == len(ground_truths) == len(image_ids):
            raise ValueError(
                f"got {len(predictions)} predictions, {len(ground_truths)} ground truths and {len(image_ids)} image ids"
            )
        for prediction, ground_truth, image_id in zip(predictions, ground_truths, image_ids):
            image_id = int(image_id)
            if image_id in self._seen:
                continue
            self._stats += self._image_stats(prediction, ground_truth, image_id)
            self._seen.add(image_id)

    def _image_stats(self, prediction: PanopticSegments, ground_truth: PanopticSegments, image_id: int) -> np.ndarray:
        """panopticapi's ``pq_compute_single_core`` for one image, as a (categories x 4) array."""
        pred_map, gt_map = _id_map(prediction[0]), _id_map(ground_truth[0])
        if pred_map.shape != gt_map.shape or pred_map.ndim != 2:
            raise ValueError(
                f"image {image_id}: predicted map of shape {pred_map.shape} and ground-truth map of shape "
                f"{gt_map.shape} must be the same (H, W)"
            )
        pred_segms = self._segments(prediction[1], image_id, "predicted")
        gt_segms = self._segments(ground_truth[1], image_id, "ground-truth")
        pred_ids, pred_inverse, pred_areas = np.unique(pred_map.ravel(), return_inverse=True, return_counts=True)
        gt_ids, gt_inverse, gt_areas = np.unique(gt_map.ravel(), return_inverse=True, return_counts=True)
        _check_predicted_ids(pred_ids, pred_segms, image_id)
        # intersections[g, p]: pixels of ground-truth id gt_ids[g] and predicted id pred_ids[p]
        intersections = np.bincount(
            gt_inverse.ravel() * len(pred_ids) + pred_inverse.ravel(), minlength=len(gt_ids) * len(pred_ids)
        ).reshape(len(gt_ids), len(pred_ids))
        gt_row = {int(label): g for g, label in enumerate(gt_ids)}
        pred_col = {int(label): p for p, label in enumerate(pred_ids)}
        void_row = intersections[gt_row[VOID]] if VOID in gt_row else np.zeros(len(pred_ids), dtype=np.int64)

        stats = np.zeros_like(self._stats)
        gt_matched: set[int] = set()
        pred_matched: set[int] = set()
        for g, p in zip(*np.nonzero(intersections)):
            gt_label, pred_label = int(gt_ids[g]), int(pred_ids[p])
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            gt_info, pred_info = gt_segms[gt_label], pred_segms[pred_label]
            if _is_crowd(gt_info) or gt_info["category_id"] != pred_info["category_id"]:
                continue
            union = pred_areas[p] + gt_areas[g] - intersections[g, p] - void_row[p]
            iou = intersections[g, p] / union
            if iou > 0.5:
                row = self._index[gt_info["category_id"]]
                stats[row, _TP] += 1
                stats[row, _IOU] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)

        crowd_by_category: dict[int, int] = {}
        for gt_label, gt_info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if _is_crowd(gt_info):  # crowd regions are never false negatives
                crowd_by_category[gt_info["category_id"]] = gt_label
                continue
            stats[self._index[gt_info["category_id"]], _FN] += 1

        for pred_label, pred_info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            p = pred_col[pred_label]
            ignored = void_row[p]
            crowd_label = crowd_by_category.get(pred_info["category_id"])
            if crowd_label is not None and crowd_label in gt_row:
                ignored += intersections[gt_row[crowd_label], p]
            if ignored / pred_areas[p] > 0.5:  # mostly on VOID and its category's crowd: not judged
                continue
            stats[self._index[pred_info["category_id"]], _FP] += 1
        return stats

    def _segments(self, segments_info: Sequence[Mapping[str, Any]], image_id: int, kind: str) -> dict[int, dict]:
        """``{segment id: info}`` with integer ids and category ids, the categories checked."""
        segments: dict[int, dict] = {}
        for info in segments_info:
            info = {**info, "id": int(info["id"]), "category_id": int(info["category_id"])}
            if info["id"] == VOID:
                raise ValueError(f"image {image_id}: a {kind} segment has id {VOID}, which means VOID")
            if info["category_id"] not in self._index:
                raise ValueError(
                    f"image {image_id}: {kind} segment {info['id']} has unknown category_id {info['category_id']}"
                )
            segments[info["id"]] = info
        return segments

    def evaluate(self, out_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
        """Sum the per-category counts of all ranks and return PQ / SQ / RQ, identical on every rank.

        Returns ``{"panoptic": {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st",
        "RQ_st", "N", "N_th", "N_st", "PQ/<category name>", ..}}``: fractions in [0, 1], averaged
        (panopticapi's ``pq_average``) over the categories with at least one tp, fp or fn, whose
        numbers are ``N*``. A category with none has a NaN ``PQ/<name>``; a group with none has NaN
        averages (panopticapi would divide by zero), and a warning says so.
        """
        stats = _all_reduce_sum(torch.from_numpy(self._stats)).numpy()
        self.reset()
        self.stats = stats
        per_class = [self._class_record(i, stats[i]) for i in range(len(self.categories))]
        metrics: dict[str, float] = {}
        for group, suffix, isthing in _GROUPS:
            records = [r for r in per_class if isthing is None or r["isthing"] == isthing]
            counted = [r for r in records if r["counted"]]
            if not counted and records and (isthing is None or metrics["N"] > 0):  # one warning when all empty
                kind = "" if isthing is None else f"{group.lower()} "
                warnings.warn(f"panoptic evaluation: no {kind}segment was predicted or annotated; "
                              f"PQ{suffix}, SQ{suffix}, RQ{suffix} are NaN", stacklevel=2)
            for name in ("PQ", "SQ", "RQ"):
                metrics[name + suffix] = sum(r[name] for r in counted) / len(counted) if counted else math.nan
            metrics["N" + suffix] = float(len(counted))
        metrics.update({f"PQ/{r['name']}": r["PQ"] for r in per_class})
        if out_dir is not None and _is_rank0():
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            records = [{k: _json_number(v) if isinstance(v, float) else v for k, v in r.items()} for r in per_class]
            summary = {k: _json_number(v) for k, v in metrics.items() if "/" not in k}
            (out / "panoptic_per_class.json").write_text(json.dumps({**summary, "categories": records}, indent=2))
        return {"panoptic": metrics}

    def _class_record(self, index: int, row: np.ndarray) -> dict[str, Any]:
        """One category's PQ / SQ / RQ as panopticapi's ``pq_average`` computes them (NaN if not counted)."""
        tp, fp, fn, iou = (float(v) for v in row)
        counted = tp + fp + fn > 0
        denominator = tp + 0.5 * fp + 0.5 * fn
        category = self.categories[index]
        return {
            "id": int(category["id"]),
            "name": self.category_names[index],
            "isthing": bool(self.isthing[index]),
            "counted": bool(counted),
            "PQ": iou / denominator if counted else math.nan,
            "SQ": (iou / tp if tp != 0 else 0.0) if counted else math.nan,
            "RQ": tp / denominator if counted else math.nan,
            "tp": int(tp),
            "fp": int(fp),
            "fn": int(fn),
            "iou_sum": iou,
        }


def _id_map(ids: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"segment-id maps must be integer arrays, got {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _is_crowd(info: Mapping[str, Any]) -> bool:
    return int(info.get("iscrowd", 0)) == 1


def _check_predicted_ids(pred_ids: np.ndarray, pred_segms: Mapping[int, Any], image_id: int) -> None:
    """panopticapi's checks: the map's ids (but VOID) and the listed ids are the same set."""
    in_map = {int(label) for label in pred_ids} - {VOID}
    unlisted = sorted(in_map - set(pred_segms))
    if unlisted:
        raise ValueError(f"image {image_id}: predicted segment ids {unlisted} are in the map but not in segments_info")
    absent = sorted(set(pred_segms) - in_map)
    if absent:
        raise ValueError(f"image {image_id}: predicted segment ids {absent} are in segments_info but not in the map")


def format_panoptic_summary(metrics: Mapping[str, float]) -> str:
    """The table panopticapi's ``pq_compute`` prints (PQ / SQ / RQ in percent and the number of
    categories counted, for All, Things and Stuff), from the ``"panoptic"`` metrics dict."""
    with_counts = all(f"N{suffix}" in metrics for _, suffix, _ in _GROUPS)
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N" if with_counts else ""),
             "-" * (10 + 7 * 4)]
    for group, suffix, _ in _GROUPS:
        line = "{:10s}| {:5.1f}  {:5.1f}  {:5.1f}".format(
            group, 100 * metrics[f"PQ{suffix}"], 100 * metrics[f"SQ{suffix}"], 100 * metrics[f"RQ{suffix}"]
        )
        lines.append(line + (" {:5d}".format(int(metrics[f"N{suffix}"])) if with_counts else ""))
    return "\n".join(line.rstrip() for line in lines)
