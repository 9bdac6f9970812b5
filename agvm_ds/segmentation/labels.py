"""Per-pixel labels around torchvision's ``GeneralizedRCNNTransform``: fit, loss, prediction.

The transform normalises, resizes and pads the images (and the boxes and masks of detection
targets) but knows no semantic label map; these helpers bring a label map to the transformed
image, compute the loss on it, and bring predicted logits back to the caller's image size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "fit_labels", "predict_labels", "segmentation_loss"]

IGNORE_INDEX = 255
"""The label of pixels without a class (unlabelled, and the padding of a batch); mmseg and detectron2's."""


def fit_labels(
    labels: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]], padded_size: Sequence[int]
) -> torch.Tensor:
    """One (N, H, W) int64 batch of label maps matching a transformed batch of images.

    Each (h, w) map is resized (nearest) to its transformed image size when that differs, then
    padded to the batch's padded size with :data:`IGNORE_INDEX`, as the images are with zeros.
    """
    batch = torch.full((len(labels), *padded_size), IGNORE_INDEX, dtype=torch.int64, device=labels[0].device)
    for out, label, (h, w) in zip(batch, labels, image_sizes):
        if label.dim() != 2:
            raise ValueError(f"a semantic label map must be (h, w), got shape {tuple(label.shape)}")
        if tuple(label.shape) != (h, w):
            label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0]
        out[:h, :w] = label
    return batch


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled pixels, logits upsampled (bilinear) to the labels' size first.

    Averaged over the pixels with a label (PyTorch's convention; mmseg's default divides by all
    pixels, padding included, which makes the loss depend on the batch's padding). A batch without
    any labelled pixel gives 0, still connected to every parameter that produced ``logits``.
    """
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (labels != IGNORE_INDEX).sum().clamp(min=1)


def predict_labels(
    logits: torch.Tensor,
    padded_size: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    original_sizes: Sequence[tuple[int, int]],
) -> list[torch.Tensor]:
    """Per image the (h, w) int64 argmax at its original size.

    Args:
        logits: (N, C, H', W') logits of the padded batch at any stride; per image (one at a time, to
            bound memory) upsampled to ``padded_size``, cropped to its transformed size
            (``image_sizes``), resized to its original size, as mmseg's inference.
    """
    predictions = []
    for logit, (h, w), size in zip(logits, image_sizes, original_sizes):
        logit = logit[None].float()
        if logit.shape[-2:] != tuple(padded_size):
            logit = F.interpolate(logit, size=tuple(padded_size), mode="bilinear", align_corners=False)
        logit = logit[..., :h, :w]
        if (h, w) != tuple(size):
            logit = F.interpolate(logit, size=tuple(size), mode="bilinear", align_corners=False)
        predictions.append(logit[0].argmax(0))
    return predictions
