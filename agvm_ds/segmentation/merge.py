"""Panoptic FPN's merge of instance and semantic predictions into one segment map.

The heuristic of the paper, as detectron2's ``combine_semantic_and_instance_outputs``: instances
claim pixels first, by decreasing score; stuff classes fill what is left. Kept a pure function so
the rules are testable on hand-built inputs.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["combine_semantic_and_instance"]


def combine_semantic_and_instance(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    sem_seg: torch.Tensor,
    *,
    overlap_threshold: float = 0.5,
    stuff_area: int = 4096,
    instance_score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """A panoptic segment map and its segments.

    Instances by decreasing score, stopping below ``instance_score_threshold``: the mask
    (``>= mask_threshold``) is dropped when empty or when more than ``overlap_threshold`` of it is
    already taken, otherwise its free pixels become a new segment. Then each stuff class of the
    semantic argmax (class 0, "thing", excluded) becomes a segment of its still-free pixels when
    they number at least ``stuff_area``. Pixels left are void (id 0).

    Args:
        masks: (N, H, W) instance mask probabilities (or booleans) at the image's size.
        labels: (N,) thing labels (1..T). scores: (N,) detection scores.
        sem_seg: (H, W) semantic argmax: 0 = thing, 1..S stuff classes.

    Returns:
        (H, W) int64 segment ids (0 = void), and per segment ``{"id", "isthing", "label"}`` plus
        ``"score"`` for things; ``label`` is the thing label or the stuff class.
    """
    panoptic = torch.zeros(sem_seg.shape, dtype=torch.int64, device=sem_seg.device)
    segments: list[dict[str, Any]] = []
    taken = torch.zeros(sem_seg.shape, dtype=torch.bool, device=sem_seg.device)
    for i in torch.argsort(scores, descending=True).tolist():
        score = float(scores[i])
        if score < instance_score_threshold:
            break
        mask = masks[i] >= mask_threshold if masks.is_floating_point() else masks[i].bool()
        area = int(mask.sum())
        if area == 0:
            continue
        overlap = int((mask & taken).sum())
        if overlap / area > overlap_threshold:
            continue
        mask = mask & ~taken
        segment_id = len(segments) + 1
        panoptic[mask] = segment_id
        taken |= mask
        segments.append({"id": segment_id, "isthing": True, "label": int(labels[i]), "score": score})
    for label in torch.unique(sem_seg).tolist():
        if label == 0:
            continue
        mask = (sem_seg == label) & ~taken
        if int(mask.sum()) < stuff_area:
            continue
        segment_id = len(segments) + 1
        panoptic[mask] = segment_id
        taken |= mask
        segments.append({"id": segment_id, "isthing": False, "label": int(label)})
    return panoptic, segments
