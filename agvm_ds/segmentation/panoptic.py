"""Panoptic FPN (Kirillov et al., 2019): torchvision's Mask R-CNN plus a semantic branch on its FPN.

Things come from Mask R-CNN, stuff from a Semantic FPN head on P2-P5 with one extra class, 0,
"thing" (detectron2's convention); :func:`~agvm_ds.segmentation.merge.combine_semantic_and_instance`
merges both into a panoptic segment map at evaluation.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torchvision.models.detection import MaskRCNN

from ..detection.backbone import TimmFPNBackbone
from .heads import SemanticFPNHead
from .labels import fit_labels, predict_labels, segmentation_loss
from .merge import combine_semantic_and_instance

__all__ = ["PanopticFPN"]

NUM_PYRAMID_LEVELS = 4  # P2-P5; the max-pooled level serves the RPN only


class PanopticFPN(MaskRCNN):
    """Mask R-CNN with ``semantic_head`` (:class:`~agvm_ds.segmentation.heads.SemanticFPNHead`,
    GroupNorm, no dropout: detectron2's ``SemSegFPNHead``).

    Training: Mask R-CNN's targets (``boxes``, ``labels``, ``masks``) plus ``sem_seg``, an (h, w)
    int64 map (0 = a thing, 1..S stuff classes, 255 = no label), which follows its image through
    the transform's resize (nearest) and padding (255). Returns Mask R-CNN's losses plus
    ``loss_sem_seg`` (cross-entropy times ``semantic_weight``).

    Evaluation: per image Mask R-CNN's ``boxes``/``labels``/``scores``/``masks`` at the original size,
    ``sem_seg`` (the (h, w) int64 argmax), ``panoptic_seg`` ((h, w) int64 segment ids, 0 = void) and
    ``segments_info`` (``{"id", "isthing", "label"[, "score"]}``; see ``combine_semantic_and_instance``).

    Args:
        num_classes: thing classes + background, as Mask R-CNN's.
        num_stuff_classes: S; the semantic head predicts S + 1 classes.
        decode_channels: width of the semantic head (detectron2: 128).
        semantic_weight: weight of the semantic loss (detectron2: 0.5).
        overlap_threshold, stuff_area, instance_score_threshold: the merge's rules (detectron2's
            defaults: 0.5, 4096 pixels, 0.5).
        kwargs: Mask R-CNN's arguments.
    """

    def __init__(
        self,
        backbone: TimmFPNBackbone,
        num_classes: Optional[int] = None,
        *,
        num_stuff_classes: int,
        decode_channels: int = 128,
        semantic_weight: float = 0.5,
        overlap_threshold: float = 0.5,
        stuff_area: int = 4096,
        instance_score_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if num_stuff_classes < 1:
            raise ValueError(f"num_stuff_classes={num_stuff_classes}: Panoptic FPN needs at least one stuff class")
        super().__init__(backbone, num_classes, **kwargs)
        self.semantic_head = SemanticFPNHead(backbone.out_channels, decode_channels, num_stuff_classes + 1,
                                             NUM_PYRAMID_LEVELS, dropout=0.0)
        self.semantic_weight = semantic_weight
        self.overlap_threshold = overlap_threshold
        self.stuff_area = stuff_area
        self.instance_score_threshold = instance_score_threshold

    def forward(
        self, images: list[torch.Tensor], targets: Optional[list[dict[str, torch.Tensor]]] = None
    ) -> Union[dict[str, torch.Tensor], list[dict[str, Any]]]:
        if self.training and targets is None:
            raise ValueError("in training mode, Mask R-CNN targets with a 'sem_seg' label map per image are expected")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        padded = batch.tensors.shape[-2:]
        features = self.backbone(batch.tensors)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        logits = self.semantic_head(list(features.values())[:NUM_PYRAMID_LEVELS])
        if self.training:
            labels = fit_labels([t["sem_seg"] for t in targets], batch.image_sizes, padded)
            semantic = self.semantic_weight * segmentation_loss(logits, labels)
            return {**detector_losses, **proposal_losses, "loss_sem_seg": semantic}
        detections = self.transform.postprocess(detections, batch.image_sizes, original_sizes)
        for detection, sem_seg in zip(detections, predict_labels(logits, padded, batch.image_sizes, original_sizes)):
            panoptic, segments = combine_semantic_and_instance(
                detection["masks"][:, 0], detection["labels"], detection["scores"], sem_seg,
                overlap_threshold=self.overlap_threshold, stuff_area=self.stuff_area,
                instance_score_threshold=self.instance_score_threshold,
            )
            detection.update(sem_seg=sem_seg, panoptic_seg=panoptic, segments_info=segments)
        return detections
