"""Semantic segmentation models with torchvision's detector interface: Semantic FPN and UperNet.

They take what torchvision's detectors take (a list of (3, h, w) images in [0, 1] and, in
training, a list of target dicts) and use the same ``GeneralizedRCNNTransform`` (normalise,
resize to ``min_size``/``max_size``, pad to a multiple of 32), so the trainer, the data pipelines
and the AGVM module split treat detectors and segmenters alike.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ..detection.backbone import TimmFPNBackbone
from .heads import FCNHead, NormLayer, SemanticFPNHead, UPerHead
from .labels import fit_labels, predict_labels, segmentation_loss

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SemanticFPN", "SemanticSegmentor", "TimmStages", "UperNet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MinSize = Union[int, Sequence[int]]


class TimmStages(TimmFPNBackbone):
    """A :class:`TimmFPNBackbone` without its pyramid: the (normalised) stage outputs C2-C5.

    For heads that build their own pyramid (UperNet's laterals belong to its decode head). The
    body, its pruning and its stage norms are the detection backbone's, so parameter names
    (``backbone.body.*``, ``backbone.norms.*``) and the AGVM ``backbone`` module are the same.
    ``out_channels`` is the list of stage widths, finest first. (The parent's constructor builds a
    1-channel pyramid, dropped at once: a few kilobytes, for not repeating the body set-up.)
    """

    def __init__(self, body: nn.Module, stage_norms: bool) -> None:
        super().__init__(body, 4, 1, None, stage_norms)
        self.fpn = None
        self.out_channels = [body.feature_info[i]["num_chs"] for i in self.indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_body(x)


def stage_channels(backbone: TimmFPNBackbone) -> list[int]:
    """Widths of the body's stage outputs that ``backbone`` uses, finest first."""
    return [backbone.body.feature_info[i]["num_chs"] for i in backbone.indices]


class SemanticSegmentor(nn.Module):
    """``transform`` + ``backbone`` + ``decode_head`` (+ ``auxiliary_head`` on C4, training only).

    Training: ``model(images, targets)`` with ``targets[i]["sem_seg"]`` an (h, w) int64 map of
    ``images[i]`` (255 = no label) returns ``{"loss_seg": ..., "loss_aux": aux_weight * ...}``
    (``loss_aux`` only with an auxiliary head). Labels follow their image through the resize
    (nearest) and the padding (255). Evaluation: ``model(images)`` returns per image
    ``{"sem_seg": (h, w) int64}`` at the image's original size; images are always resized to
    ``min_size``/``max_size`` first (the last ``min_size`` when several are given), as
    torchvision's detectors do.

    Subclasses build the heads and say which features feed them (:meth:`features`).

    Args:
        resize_in_model: False leaves training images at their size (a data pipeline that crops or
            jitters scales); evaluation images are resized either way.
    """

    def __init__(
        self,
        backbone: TimmFPNBackbone,
        decode_head: nn.Module,
        auxiliary_head: Optional[nn.Module],
        aux_weight: float,
        min_size: MinSize,
        max_size: int,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        resize_in_model: bool = True,
    ) -> None:
        super().__init__()
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, list(image_mean or IMAGENET_MEAN), list(image_std or IMAGENET_STD),
            _skip_resize=not resize_in_model,
        )
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_weight = aux_weight

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the body's stage outputs C2-C5, the decode head's inputs) of a padded batch."""
        raise NotImplementedError

    def forward(
        self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None
    ) -> Union[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        if self.training and targets is None:
            raise ValueError("in training mode, targets with a 'sem_seg' label map per image are expected")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, _ = self.transform(images)
        padded = batch.tensors.shape[-2:]
        stages, inputs = self.features(batch.tensors)
        logits = self.decode_head(inputs)
        if self.training:
            labels = fit_labels([t["sem_seg"] for t in targets], batch.image_sizes, padded)
            losses = {"loss_seg": segmentation_loss(logits, labels)}
            if self.auxiliary_head is not None:
                losses["loss_aux"] = self.aux_weight * segmentation_loss(self.auxiliary_head(stages[2]), labels)
            return losses
        return [{"sem_seg": p} for p in predict_labels(logits, padded, batch.image_sizes, original_sizes)]


def _auxiliary_head(backbone: TimmFPNBackbone, num_classes: int, aux_weight: float, aux_channels: int,
                    dropout: float, norm_layer: NormLayer) -> Optional[FCNHead]:
    if aux_weight <= 0:
        return None  # no head without a loss: its parameters would get no gradient
    return FCNHead(stage_channels(backbone)[2], aux_channels, num_classes, dropout, norm_layer)


class SemanticFPN(SemanticSegmentor):
    """Semantic FPN (Kirillov et al., Panoptic Feature Pyramid Networks, 2019): the detectors' FPN
    backbone (P2-P5) and :class:`~agvm_ds.segmentation.heads.SemanticFPNHead` (GroupNorm).

    Args:
        backbone: a :class:`TimmFPNBackbone` on C2-C5 without extra levels.
        num_classes: the classes (no background class).
        decode_channels: width of the head (128 in the paper and mmseg).
        dropout: before each classifier (mmseg: 0.1).
        aux_weight: loss weight of an FCN head on C4; 0 (the default, as mmseg's recipe) builds none.
        aux_channels: width of that head.
        norm_layer: norm of the auxiliary head (BatchNorm; the decode head uses GroupNorm).
    """

    def __init__(
        self,
        backbone: TimmFPNBackbone,
        num_classes: int,
        min_size: MinSize = 512,
        max_size: int = 2048,
        decode_channels: int = 128,
        dropout: float = 0.1,
        aux_weight: float = 0.0,
        aux_channels: int = 256,
        norm_layer: NormLayer = nn.BatchNorm2d,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        resize_in_model: bool = True,
    ) -> None:
        super().__init__(
            backbone,
            SemanticFPNHead(backbone.out_channels, decode_channels, num_classes, dropout=dropout),
            _auxiliary_head(backbone, num_classes, aux_weight, aux_channels, dropout, norm_layer),
            aux_weight, min_size, max_size, image_mean, image_std, resize_in_model,
        )

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stages = self.backbone.forward_body(x)
        pyramid = self.backbone.fpn(OrderedDict((str(i), f) for i, f in enumerate(stages)))
        return stages, list(pyramid.values())


class UperNet(SemanticSegmentor):
    """UperNet (Xiao et al., Unified Perceptual Parsing, 2018) as mmseg trains it with Swin: the
    body's C2-C5 (:class:`TimmStages`), :class:`~agvm_ds.segmentation.heads.UPerHead` and an
    auxiliary FCN head on C4 (loss weight 0.4). Heads use BatchNorm (``nn.SyncBatchNorm`` when the
    spec's ``norm`` is ``sync_bn``; mmseg: SyncBN), so a training batch needs at least two images
    (see ``UPerHead``).

    Args:
        num_classes: the classes (no background class).
        decode_channels: width of the decode head (mmseg: 512).
        aux_weight: loss weight of the auxiliary head; 0 builds none.
        aux_channels: width of the auxiliary head (mmseg: 256).
    """

    def __init__(
        self,
        backbone: TimmStages,
        num_classes: int,
        min_size: MinSize = 512,
        max_size: int = 2048,
        decode_channels: int = 512,
        dropout: float = 0.1,
        aux_weight: float = 0.4,
        aux_channels: int = 256,
        norm_layer: NormLayer = nn.BatchNorm2d,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        resize_in_model: bool = True,
    ) -> None:
        super().__init__(
            backbone,
            UPerHead(backbone.out_channels, decode_channels, num_classes, dropout=dropout, norm_layer=norm_layer),
            _auxiliary_head(backbone, num_classes, aux_weight, aux_channels, dropout, norm_layer),
            aux_weight, min_size, max_size, image_mean, image_std, resize_in_model,
        )

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stages = self.backbone(x)
        return stages, stages
