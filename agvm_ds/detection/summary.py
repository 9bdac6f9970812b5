"""Parameters and forward FLOPs of a detector or segmenter, per AGVM module (``agvm-model-info`` prints them).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` part by part (body, FPN, heads on
pooled RoIs of the right shape, dense heads on the feature maps they read) rather than through the
whole model: torchvision's ``nms`` and ``roi_align`` have no meta kernels, and counting the parts works
the same on the meta device (a 1B model costs no memory) and on the CPU. FlopCounterMode counts matrix
products, convolutions and attention; RoIAlign, NMS, anchors, box decoding, the transform's resize
and the upsampling of logits to the image are not counted (a small share of the cost).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import MaskRCNN, RetinaNet

__all__ = ["forward_flops", "parameter_counts", "roi_counts", "training_only_modules"]


def parameter_counts(model: nn.Module, trainable_only: bool = False) -> dict[str, int]:
    """Number of parameters per AGVM module of ``model.agvm_modules``, and ``"total"``.

    A parameter belongs to the module with its longest matching prefix; parameters of no module (none
    in a detector built here) are counted under ``"other"``.
    """
    counts = {module: 0 for module in model.agvm_modules}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        owners = [
            (len(prefix), module)
            for module, prefixes in model.agvm_modules.items()
            for prefix in prefixes
            if name == prefix or name.startswith(prefix + ".")
        ]
        owner = max(owners)[1] if owners else "other"
        counts[owner] = counts.get(owner, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts


def roi_counts(model: nn.Module) -> dict[str, int]:
    """The number of RoIs per image the heads of an R-CNN run on at inference, at most.

    The box head sees every proposal the RPN keeps (``rpn_post_nms_top_n_test``), the mask head every
    detection (``box_detections_per_img``). Empty for RetinaNet and the semantic models, whose heads
    are dense.
    """
    if not hasattr(model, "roi_heads"):
        return {}
    counts = {"roi_box_head": model.rpn._post_nms_top_n["testing"]}  # rpn.post_nms_top_n() depends on .training
    if isinstance(model, MaskRCNN):
        counts["mask_head"] = model.roi_heads.detections_per_img
    return counts


def training_only_modules(model: nn.Module) -> list[str]:
    """AGVM modules that run in training only (counted by :func:`forward_flops` all the same, as a
    training step pays for them): the auxiliary head of a semantic model."""
    return ["auxiliary_head"] if getattr(model, "auxiliary_head", None) is not None else []


def forward_flops(model: nn.Module, size: tuple[int, int]) -> dict[str, int]:
    """Forward FLOPs of one image per AGVM module, and ``"total"``, on the model's device.

    Args:
        size: (height, width) of the network input, i.e. after the model's resize; it is padded
            to a multiple of 32 as ``GeneralizedRCNNTransform`` does.

    The R-CNN heads are counted at the RoI numbers of ``roi_counts`` (their inference maximum); a
    semantic model's auxiliary head, which runs in training only, is counted too.
    """
    device = next(model.parameters()).device
    height, width = (math.ceil(s / 32) * 32 for s in size)
    flops: dict[str, int] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        image = torch.zeros(1, 3, height, width, device=device)
        if hasattr(model, "decode_head"):
            _segmentor_flops(model, image, flops)
        else:
            _detector_flops(model, image, flops)
    model.train(was_training)
    flops["total"] = sum(flops.values())
    return flops


def _detector_flops(model: nn.Module, image: torch.Tensor, flops: dict[str, int]) -> None:
    """Body, FPN, then RetinaNet's dense heads or the R-CNN's RPN head, RoI heads (and Panoptic FPN's
    semantic head on P2-P5)."""
    features, flops["backbone"] = _count(model.backbone.forward_body, image)
    pyramid, flops["fpn"] = _count(model.backbone.fpn, OrderedDict((str(i), f) for i, f in enumerate(features)))
    levels = list(pyramid.values())
    if isinstance(model, RetinaNet):
        flops["cls_head"] = _count(model.head.classification_head, levels)[1]
        flops["reg_head"] = _count(model.head.regression_head, levels)[1]
        return
    heads, rois = model.roi_heads, roi_counts(model)
    flops["rpn"] = _count(model.rpn.head, levels)[1]
    pooled = _pooled(rois["roi_box_head"], model.backbone.out_channels, heads.box_roi_pool, image.device)
    flops["roi_box_head"] = _count(lambda x: heads.box_predictor(heads.box_head(x)), pooled)[1]
    if "mask_head" in rois:
        pooled = _pooled(rois["mask_head"], model.backbone.out_channels, heads.mask_roi_pool, image.device)
        flops["mask_head"] = _count(lambda x: heads.mask_predictor(heads.mask_head(x)), pooled)[1]
    if hasattr(model, "semantic_head"):
        levels = levels[:len(model.semantic_head.scale_heads)]  # P2-P5: the max-pooled level serves the RPN only
        flops["semantic_head"] = _count(model.semantic_head, levels)[1]


def _segmentor_flops(model: nn.Module, image: torch.Tensor, flops: dict[str, int]) -> None:
    """Body, FPN (Semantic FPN; UperNet's pyramid belongs to its decode head), decode head, and the
    auxiliary head on C4, as ``SemanticSegmentor.forward`` feeds them."""
    stages, flops["backbone"] = _count(model.backbone.forward_body, image)
    inputs = stages
    if model.backbone.fpn is not None:
        pyramid, flops["fpn"] = _count(model.backbone.fpn, OrderedDict((str(i), f) for i, f in enumerate(stages)))
        inputs = list(pyramid.values())
    flops["decode_head"] = _count(model.decode_head, inputs)[1]
    if model.auxiliary_head is not None:
        flops["auxiliary_head"] = _count(model.auxiliary_head, stages[2])[1]


def _count(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops()


def _pooled(rois: int, channels: int, pool: nn.Module, device: torch.device) -> torch.Tensor:
    return torch.zeros(rois, channels, *pool.output_size, device=device)
