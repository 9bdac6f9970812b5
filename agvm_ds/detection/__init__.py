"""Detectors (Faster/Mask R-CNN, RetinaNet from torchvision) on timm backbones, picked by name."""
from .backbone import TimmFPNBackbone, create_body, freeze_stages
from .detectors import agvm_modules, build_backbone, build_detector
from .spec import MODELS_DIR, ModelSpec, load_spec, model_names

__all__ = [
    "MODELS_DIR",
    "ModelSpec",
    "TimmFPNBackbone",
    "agvm_modules",
    "build_backbone",
    "build_detector",
    "create_body",
    "freeze_stages",
    "load_spec",
    "model_names",
]
