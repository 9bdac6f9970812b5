"""torchvision detectors on timm backbones, with their AGVM modules named after torchvision's parts.

A torchvision detector is ``transform`` + ``backbone`` + ``rpn`` + ``roi_heads`` (or + ``head`` for
RetinaNet). The AGVM modules follow these seams, so the words in the model, the config, the logs and
the plots are the same. The segmenters of ``agvm_ds.segmentation`` are built here too: a semantic
model is ``transform`` + ``backbone`` + ``decode_head`` (+ ``auxiliary_head``), Panoptic FPN is a
Mask R-CNN + ``semantic_head``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .backbone import TimmFPNBackbone, create_body, freeze_stages
from .spec import DETECTORS, ModelSpec, backbone_family

if TYPE_CHECKING:
    from ..segmentation.heads import NormLayer

__all__ = ["build_backbone", "build_detector", "agvm_modules"]


def build_backbone(spec: ModelSpec, load_pretrained: bool = True) -> TimmFPNBackbone:
    """The backbone of ``spec``: C2-C5 + max-pooled P6 for the R-CNNs (Panoptic FPN's included),
    C3-C5 + P6/P7 for RetinaNet, C2-C5 for Semantic FPN; UperNet's is the body's C2-C5 with no FPN
    (``agvm_ds.segmentation.TimmStages``: its decode head has its own pyramid).
    """
    family = backbone_family(spec.backbone)
    if family == "resnet" and spec.norm == "frozen_bn" and spec.pretrained_file is None and not spec.pretrained:
        warnings.warn(
            f"{spec.name or spec.backbone}: norm=frozen_bn without pretrained_file freezes BN at its initial "
            "statistics (no normalisation); give pretrained_file, or use norm=bn / sync_bn from scratch",
            stacklevel=2,
        )
    body = create_body(
        spec.backbone,
        norm=spec.norm,
        pretrained=spec.pretrained if load_pretrained else False,
        pretrained_file=spec.pretrained_file if load_pretrained else None,
        checkpointing=spec.checkpointing,
        **spec.backbone_kwargs,
    )
    freeze_stages(body, spec.trainable_stages)
    stage_norms = family == "swin"
    if spec.detector == "upernet":
        from ..segmentation.semantic import TimmStages  # lazily: agvm_ds.segmentation builds on this package

        return TimmStages(body, stage_norms)
    if spec.detector == "retinanet":
        indices, extra = 3, LastLevelP6P7(spec.fpn_channels, spec.fpn_channels)
    elif spec.detector == "semantic_fpn":
        indices, extra = 4, None
    else:
        indices, extra = 4, LastLevelMaxPool()
    return TimmFPNBackbone(body, indices, spec.fpn_channels, extra, stage_norms=stage_norms)


def head_norm(spec: ModelSpec) -> "NormLayer":
    """The BatchNorm of the segmentation heads: synchronised when the body's is (``norm: sync_bn``)."""
    return nn.SyncBatchNorm if spec.norm == "sync_bn" else nn.BatchNorm2d


def build_detector(
    spec: ModelSpec,
    device: Optional[Union[str, torch.device]] = None,
    *,
    resize_in_model: bool = True,
    load_pretrained: bool = True,
) -> nn.Module:
    """Builds the detector or segmenter of ``spec``, with ``agvm_modules`` (AGVM module -> submodule
    prefixes) set.

    Args:
        device: where parameters are created. ``"meta"`` allocates nothing (for counting parameters
            and FLOPs of huge models); pretrained weights are then not loaded.
        resize_in_model: whether the model resizes training images itself. The model's
            ``GeneralizedRCNNTransform`` normalises, resizes to ``min_size``/``max_size`` and pads to
            a multiple of 32; a data pipeline that resizes (scale jitter, LSJ) passes False so its
            sizes reach the network, as torchvision's large-scale-jitter recipe does. Evaluation
            images are always resized by the model, to ``spec.min_size``/``spec.max_size``.
        load_pretrained: load ``spec.pretrained_file``; False when trained weights are loaded next.
    """
    is_meta = device is not None and torch.device(device).type == "meta"
    with torch.device(device) if device is not None else contextlib.nullcontext():
        backbone = build_backbone(spec, load_pretrained=load_pretrained and not is_meta)
        common = dict(num_classes=spec.num_classes, min_size=spec.min_size, max_size=spec.max_size,
                      _skip_resize=not resize_in_model)  # torchvision's own switch of GeneralizedRCNNTransform
        anchors = AnchorGenerator(spec.anchor_sizes, spec.aspect_ratios) if spec.anchor_sizes is not None else None
        if spec.task == "semantic":
            model = DETECTORS[spec.detector](
                backbone, spec.num_classes, spec.min_size, spec.max_size, norm_layer=head_norm(spec),
                resize_in_model=resize_in_model, **spec.detector_kwargs,
            )
        elif spec.detector == "faster_rcnn":
            model = FasterRCNN(backbone, **common, rpn_anchor_generator=anchors, **spec.detector_kwargs)
        elif spec.detector in ("mask_rcnn", "panoptic_fpn"):
            # torchvision's mask head (4 convs + deconv) at the FPN's width instead of a fixed 256.
            # torchvision then wants num_classes=None and every predictor given: the box predictor
            # is its default, on TwoMLPHead's 1024 features.
            width = spec.fpn_channels
            extra = {"num_stuff_classes": spec.num_stuff_classes} if spec.detector == "panoptic_fpn" else {}
            model = DETECTORS[spec.detector](
                backbone,
                **extra,
                **dict(common, num_classes=None),
                box_predictor=FastRCNNPredictor(1024, spec.num_classes),
                mask_head=MaskRCNNHeads(width, [width] * 4, 1),
                mask_predictor=MaskRCNNPredictor(width, width, spec.num_classes),
                rpn_anchor_generator=anchors,
                **spec.detector_kwargs,
            )
        else:
            model = RetinaNet(backbone, **common, anchor_generator=anchors, **spec.detector_kwargs)
    model.agvm_modules = agvm_modules(model)
    return model


def agvm_modules(model: nn.Module) -> dict[str, list[str]]:
    """AGVM module -> submodule prefixes of a model built here; ``backbone`` is the anchor.

    ``backbone`` is the timm body with its stage norms, ``fpn`` the pyramid and its extra levels;
    then ``rpn`` and ``roi_box_head`` (+ ``mask_head``, + ``semantic_head`` for Panoptic FPN) for
    the R-CNNs, ``cls_head`` and ``reg_head`` for RetinaNet, ``decode_head`` (+ ``auxiliary_head``)
    for the semantic models (UperNet has no ``fpn``: its pyramid is part of its decode head).
    """
    backbone = ["backbone.body"] + (["backbone.norms"] if model.backbone.norms is not None else [])
    modules = {"backbone": backbone}
    if model.backbone.fpn is not None:
        modules["fpn"] = ["backbone.fpn"]
    if hasattr(model, "decode_head"):
        modules["decode_head"] = ["decode_head"]
        if model.auxiliary_head is not None:
            modules["auxiliary_head"] = ["auxiliary_head"]
        return modules
    if isinstance(model, RetinaNet):
        modules["cls_head"] = ["head.classification_head"]
        modules["reg_head"] = ["head.regression_head"]
        return modules
    modules["rpn"] = ["rpn"]
    modules["roi_box_head"] = ["roi_heads.box_head", "roi_heads.box_predictor"]
    if isinstance(model, MaskRCNN):
        modules["mask_head"] = ["roi_heads.mask_head", "roi_heads.mask_predictor"]
    if hasattr(model, "semantic_head"):
        modules["semantic_head"] = ["semantic_head"]
    return modules
