"""Detection augmentation pipelines built from ``torchvision.transforms.v2``.

Why v2: its transforms move images, ``BoundingBoxes`` and ``Mask`` tv_tensors together, so a flip
or a crop cannot leave boxes and masks disagreeing, and ``SanitizeBoundingBoxes`` drops the
instances a crop pushed out (with their labels, masks, areas and crowd flags) in one place.

Recipes (train only; evaluation always gets ``ToDtype`` alone because torchvision detectors resize
evaluation images inside the model, in ``GeneralizedRCNNTransform``):

- ``"none"``: no augmentation.
- ``"hflip"``: horizontal flip.
- ``"multiscale"``: resize the shorter side to a random choice of ``min_size`` (capped so the
  longer side stays <= ``max_size``), then flip: the torchvision references' "multiscale" preset.
- ``"lsj"``: large-scale jitter (Ghiasi et al., "Simple Copy-Paste", 2021): rescale so the image
  fits ``lsj_size`` times a factor drawn from ``lsj_scale_range``, random-crop / pad to
  ``lsj_size`` x ``lsj_size``, flip: the references' "lsj" preset.

Every train pipeline ends with ``SanitizeBoundingBoxes`` and ``ToDtype(float32, scale=True)``.
With a resizing recipe (``multiscale``, ``lsj``) the trainer turns the model's own training resize
off, so the data-side scale jitter is what the model sees, and sets the model's evaluation resize
from the same recipe (``DataConfig.test_resize``: the largest multiscale size, or ``lsj_size``,
unless ``data.test_size`` / ``data.test_max_size`` say otherwise): one setting drives both. With
``none`` / ``hflip`` the model's ``min_size`` / ``max_size`` resize training and evaluation alike.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["COCO_MULTISCALE_SIZES", "RECIPES", "build_transforms"]

RECIPES: tuple[str, ...] = ("none", "hflip", "multiscale", "lsj")
#: Shorter-side sizes of the torchvision references' COCO "multiscale" preset.
COCO_MULTISCALE_SIZES: tuple[int, ...] = tuple(range(480, 801, 32))


def build_transforms(
    train: bool,
    recipe: str = "multiscale",
    *,
    min_size: int | Sequence[int] = COCO_MULTISCALE_SIZES,
    max_size: int = 1333,
    hflip_prob: float = 0.5,
    lsj_size: int = 1024,
    lsj_scale_range: tuple[float, float] = (0.1, 2.0),
    fill: int | Sequence[int] = 0,
) -> v2.Compose:
    """The pipeline for ``CocoDetection(transforms=...)``, called as ``t(image, target)``.

    Args:
        train: augment (``recipe``) or only convert (evaluation).
        recipe: one of :data:`RECIPES`; validated even when ``train`` is False.
        min_size, max_size: shorter-side choices and longer-side cap for ``"multiscale"``
            (COCO defaults; for the 256 px synthetic set e.g. ``min_size=range(192, 321, 32)``).
        hflip_prob: probability of a horizontal flip in every recipe but ``"none"``.
        lsj_size, lsj_scale_range: output side and scale range for ``"lsj"``.
        fill: image padding value for ``"lsj"`` (masks are padded with 0).

    Returns:
        A ``v2.Compose`` mapping a uint8 ``tv_tensors.Image`` and target dict to a float32 image
        in [0, 1] and the transformed target.
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    to_float = v2.ToDtype(torch.float32, scale=True)
    if not train:
        return v2.Compose([to_float])

    steps: list[v2.Transform] = []
    if recipe == "multiscale":
        sizes = [min_size] if isinstance(min_size, int) else list(min_size)
        steps.append(v2.RandomShortestSize(min_size=sizes, max_size=max_size, antialias=True))
    elif recipe == "lsj":
        steps += [
            v2.ScaleJitter(target_size=(lsj_size, lsj_size), scale_range=lsj_scale_range, antialias=True),
            v2.RandomCrop(
                (lsj_size, lsj_size),
                pad_if_needed=True,
                fill={tv_tensors.Image: fill, tv_tensors.Mask: 0, "others": 0},
            ),
        ]
    if recipe != "none":
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    steps += [v2.SanitizeBoundingBoxes(labels_getter=_instance_fields), to_float]
    return v2.Compose(steps)


def _instance_fields(inputs: Any) -> tuple[torch.Tensor, ...]:
    """Per-instance tensors that must be filtered with the boxes (masks are found automatically).

    A module-level function, not a lambda, so the pipeline pickles into spawned workers.
    """
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[k] for k in ("labels", "area", "iscrowd") if k in target)
