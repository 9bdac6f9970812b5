"""COCO evaluation (pycocotools) of torchvision detector outputs, gathered across ranks."""
from .coco_eval import IOU_TYPES, METRIC_NAMES, CocoEvaluator, format_coco_summary

__all__ = ["IOU_TYPES", "METRIC_NAMES", "CocoEvaluator", "format_coco_summary"]
