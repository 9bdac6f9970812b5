"""The evaluation of an experiment's task, one interface for the trainer and agvm-eval.

Why an adapter per task: the evaluation loop (every validation image once across ranks, the model in
eval mode) is the same for every task; what differs is what a model returns and what it is compared
with. Detection hands boxes (and masks) to pycocotools; semantic segmentation sums a confusion matrix;
panoptic segmentation maps the model's contiguous labels back to the data set's category ids and reads
the ground-truth segments from the PNGs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

import torch
import torch.distributed as dist

from ..evaluation import CocoEvaluator, format_coco_summary
from ..evaluation.panoptic import PanopticEvaluator, format_panoptic_summary
from ..evaluation.semantic import SemanticEvaluator, format_semantic_summary

__all__ = ["TaskEvaluator", "build_evaluator", "format_metrics"]

Output = Mapping[str, Any]
Metrics = dict[str, dict[str, float]]


class TaskEvaluator(Protocol):
    """What the evaluation loops need of a task's evaluator; ``evaluate(out_dir)`` writes
    ``out_dir/metrics.json`` (the returned metrics) and the evaluator's own files."""

    def update(self, outputs: Sequence[Output], targets: Sequence[Output]) -> None:
        """Adds one batch: the model's eval outputs and the loader's targets, image by image."""

    def evaluate(self, out_dir: Optional[Union[str, os.PathLike]] = None) -> Metrics:
        """The metrics over every image seen on every rank (a collective: all ranks call it)."""


class DetectionEvaluation:
    def __init__(self, dataset: Any, iou_types: Sequence[str]) -> None:
        self.coco = CocoEvaluator(dataset.coco, iou_types, dataset.contiguous_to_category_id)

    def update(self, outputs: Sequence[Output], targets: Sequence[Output]) -> None:
        self.coco.update([{k: v.float().cpu() for k, v in o.items()} for o in outputs],
                         [t["image_id"] for t in targets])

    def evaluate(self, out_dir: Optional[Union[str, os.PathLike]] = None) -> Metrics:
        return self.coco.evaluate(out_dir)


class SemanticEvaluation:
    def __init__(self, dataset: Any) -> None:
        self.semantic = SemanticEvaluator(dataset.classes, dataset.ignore_index)

    def update(self, outputs: Sequence[Output], targets: Sequence[Output]) -> None:
        self.semantic.update([o["sem_seg"].cpu() for o in outputs], [torch.as_tensor(t["sem_seg"]) for t in targets],
                             [t["image_id"] for t in targets])

    def evaluate(self, out_dir: Optional[Union[str, os.PathLike]] = None) -> Metrics:
        return _written(self.semantic.evaluate(out_dir), out_dir)


class PanopticEvaluation:
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.panoptic = PanopticEvaluator(dataset.categories)

    def update(self, outputs: Sequence[Output], targets: Sequence[Output]) -> None:
        image_ids = [t["image_id"] for t in targets]
        self.panoptic.update([panoptic_prediction(o, self.dataset) for o in outputs],
                             [self.dataset.gt_segments(i) for i in image_ids], image_ids)

    def evaluate(self, out_dir: Optional[Union[str, os.PathLike]] = None) -> Metrics:
        return _written(self.panoptic.evaluate(out_dir), out_dir)


def _written(metrics: Metrics, out_dir: Optional[Union[str, os.PathLike]]) -> Metrics:
    """``metrics`` after rank 0 wrote them to ``out_dir/metrics.json``, as the COCO evaluator does for its own."""
    if out_dir is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def panoptic_prediction(output: Output, dataset: Any) -> tuple[torch.Tensor, list[dict[str, int]]]:
    """A panoptic model's output as (segment-id map, segments with the data set's category ids)."""
    segments = [{"id": s["id"], "category_id": category_id(s, dataset)} for s in output["segments_info"]]
    return output["panoptic_seg"].cpu(), segments


def category_id(segment: Mapping[str, Any], dataset: Any) -> int:
    """The data set's category id of a segment the model labelled with a contiguous thing or stuff label."""
    mapping = dataset.contiguous_to_thing if segment["isthing"] else dataset.contiguous_to_stuff
    return mapping[int(segment["label"])]


def format_metrics(metrics: Metrics) -> str:
    """Metrics of any task (``{"bbox": ..., "segm": ...}``, ``{"sem_seg": ...}``, ``{"panoptic": ...}``) as the
    tables the logs show."""
    formats = {"sem_seg": format_semantic_summary, "panoptic": format_panoptic_summary}
    return "\n".join(f"{kind}:\n{formats.get(kind, format_coco_summary)(values)}" for kind, values in metrics.items())


def build_evaluator(task: str, dataset: Any, iou_types: Sequence[str] = ("bbox",)) -> TaskEvaluator:
    """The evaluator of ``task`` (``ModelSpec.task``) on ``dataset``; ``iou_types`` for detection."""
    if task == "semantic":
        return SemanticEvaluation(dataset)
    if task == "panoptic":
        return PanopticEvaluation(dataset)
    return DetectionEvaluation(dataset, iou_types)
