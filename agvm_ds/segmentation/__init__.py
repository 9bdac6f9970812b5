"""Semantic (Semantic FPN, UperNet) and panoptic (Panoptic FPN) segmentation on the detectors' timm backbones.

Built by name like the detectors (``agvm_ds.detection.build_detector``), with the same call
convention and AGVM module split.
"""
from .heads import FCNHead, SemanticFPNHead, UPerHead
from .labels import IGNORE_INDEX, fit_labels, predict_labels, segmentation_loss
from .merge import combine_semantic_and_instance
from .panoptic import PanopticFPN
from .semantic import SemanticFPN, SemanticSegmentor, TimmStages, UperNet

__all__ = [
    "FCNHead",
    "IGNORE_INDEX",
    "PanopticFPN",
    "SemanticFPN",
    "SemanticFPNHead",
    "SemanticSegmentor",
    "TimmStages",
    "UPerHead",
    "UperNet",
    "combine_semantic_and_instance",
    "fit_labels",
    "predict_labels",
    "segmentation_loss",
]
