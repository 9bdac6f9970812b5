"""Evaluation across ranks: COCO detection (pycocotools), semantic segmentation (mIoU) and panoptic quality."""
from .coco_eval import IOU_TYPES, METRIC_NAMES, CocoEvaluator, format_coco_summary
from .panoptic import PanopticEvaluator, format_panoptic_summary
from .semantic import SemanticEvaluator, format_semantic_summary

__all__ = [
    "IOU_TYPES",
    "METRIC_NAMES",
    "CocoEvaluator",
    "format_coco_summary",
    "SemanticEvaluator",
    "format_semantic_summary",
    "PanopticEvaluator",
    "format_panoptic_summary",
]
