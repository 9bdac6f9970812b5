"""Augmentation pipelines for semantic and panoptic segmentation, built from ``torchvision.transforms.v2``.

Semantic (:func:`build_semantic_transforms`) follows mmsegmentation's ADE20K recipe: random rescale
keeping the aspect ratio, a random crop that avoids crops dominated by one class, a horizontal flip
and photometric distortion. Labels are resized with nearest interpolation (v2 does that for every
``tv_tensors.Mask``), so no value outside the label set appears. Nothing is padded here: the model
pads a batch with 0 (image) and 255 (label).

Panoptic (:func:`build_panoptic_transforms`) is :func:`~agvm_ds.data.transforms.build_transforms`
with two steps wrapped so the H x W ``"sem_seg"`` target survives them: torchvision's
``SanitizeBoundingBoxes`` indexes every ``tv_tensors.Mask`` with the kept-instance mask (which
would cut rows out of the semantic map, or skip it only by luck), and the ``"lsj"`` crop pads every
mask with one value (instance masks need 0, the semantic map needs 255).

All randomness comes from torch's global RNG (the trainer seeds it per sample for exact resume),
and every step is a module-level class, so pipelines pickle into spawned workers.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .semantic import IGNORE_INDEX
from .transforms import build_transforms

__all__ = [
    "KeepOut",
    "PadSemanticWithIgnore",
    "RandomCropCatMax",
    "RandomRescale",
    "build_panoptic_transforms",
    "build_semantic_transforms",
]

SEM_SEG_KEY = "sem_seg"


def build_semantic_transforms(
    train: bool,
    *,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    crop_size: int = 512,
    cat_max_ratio: float = 0.75,
    hflip_prob: float = 0.5,
    photometric: bool = True,
) -> v2.Compose:
    """The pipeline for ``SemanticSegmentation(transforms=...)``, called as ``t(image, target)``.

    Args:
        train: augment, or (evaluation) only convert: the model resizes evaluation images itself.
        scale, ratio_range: rescale so the image fits ``(scale[0] * r, scale[1] * r)`` (long side,
            short side), ``r`` uniform in ``ratio_range`` (mmseg ``Resize(keep_ratio=True)``).
        crop_size: crop at most ``crop_size`` x ``crop_size`` (smaller sides are kept whole).
        cat_max_ratio: redraw the crop (up to 10 times) while one class covers more than this share
            of its labelled pixels (mmseg ``RandomCrop(cat_max_ratio)``); 1 turns the check off.
        hflip_prob: probability of a horizontal flip.
        photometric: random brightness, contrast, saturation and hue (mmseg ``PhotoMetricDistortion``).

    Returns:
        A ``v2.Compose`` giving a float32 image in [0, 1] and the int64 ``"sem_seg"`` mask.
    """
    to_float = v2.ToDtype(torch.float32, scale=True)
    if not train:
        return v2.Compose([to_float])
    steps: list[nn.Module] = [
        RandomRescale(scale, ratio_range),
        RandomCropCatMax(crop_size, cat_max_ratio),
        v2.RandomHorizontalFlip(p=hflip_prob),
    ]
    if photometric:
        steps += [
            v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
            v2.RandomApply([v2.ColorJitter(contrast=0.5)], p=0.5),
            v2.RandomApply([v2.ColorJitter(saturation=0.5)], p=0.5),
            v2.RandomApply([v2.ColorJitter(hue=18 / 180)], p=0.5),
        ]
    steps.append(to_float)
    return v2.Compose(steps)


def build_panoptic_transforms(train: bool, recipe: str = "multiscale", **kwargs: Any) -> v2.Compose:
    """:func:`~agvm_ds.data.transforms.build_transforms` (same recipes and arguments) for panoptic targets.

    ``"sem_seg"`` is resized, flipped and cropped with the image (nearest; padded with 255 by the
    ``"lsj"`` crop) and left out of ``SanitizeBoundingBoxes``, which filters only the instances.
    """
    steps: list[nn.Module] = []
    for step in build_transforms(train, recipe, **kwargs).transforms:
        if isinstance(step, v2.SanitizeBoundingBoxes):
            step = KeepOut(step, SEM_SEG_KEY)
        elif isinstance(step, v2.RandomCrop):
            step = PadSemanticWithIgnore(step, SEM_SEG_KEY)
        steps.append(step)
    return v2.Compose(steps)


class RandomRescale(v2.Transform):
    """Resize keeping the aspect ratio so the image fits ``(scale[0] * r, scale[1] * r)``, r ~ U(ratio_range).

    As mmcv's ``imrescale``: the factor is ``min(long_cap / long_side, short_cap / short_side)``.
    Masks are resized with (centre-aligned) nearest interpolation, the image bilinearly with antialiasing.
    """

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]) -> None:
        super().__init__()
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {ratio_range}")
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        long_cap, short_cap = int(max(self.scale) * ratio), int(min(self.scale) * ratio)
        factor = min(long_cap / max(height, width), short_cap / min(height, width))
        return {"size": [max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            # Centre-aligned nearest, like the bilinear image resize (v2's mask default, NEAREST, is
            # off by up to one source pixel when shrinking).
            flat = inpt.as_subclass(torch.Tensor).reshape(-1, *inpt.shape[-2:])
            resized = F.resize_image(flat, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
            return tv_tensors.wrap(resized.reshape(*inpt.shape[:-2], *resized.shape[-2:]), like=inpt)
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class RandomCropCatMax(v2.Transform):
    """Crop at most ``size`` x ``size``, redrawn up to 10 times while one class dominates the crop.

    mmseg's ``RandomCrop(cat_max_ratio)``: a crop is accepted when it holds more than one labelled
    class and none covers ``cat_max_ratio`` or more of its labelled (non-255) pixels; after 10
    rejections the 11th draw is used as is. The labels are the first 2-D ``tv_tensors.Mask`` of the sample.
    """

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"crop size must be >= 1, got {size}")
        self.size = size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(self.size, height), min(self.size, width)
        labels = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask) and x.ndim == 2), None)
        top, left = self._draw(height - crop_h, width - crop_w)
        if labels is not None and self.cat_max_ratio < 1:
            for _ in range(10):
                if self._balanced(labels[top : top + crop_h, left : left + crop_w]):
                    break
                top, left = self._draw(height - crop_h, width - crop_w)
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    @staticmethod
    def _draw(margin_h: int, margin_w: int) -> tuple[int, int]:
        return int(torch.randint(margin_h + 1, ())), int(torch.randint(margin_w + 1, ()))

    def _balanced(self, crop: torch.Tensor) -> bool:
        values = crop.reshape(-1)
        counts = torch.bincount(values[values != self.ignore_index].long())
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class KeepOut(nn.Module):
    """Run ``transform`` on ``(image, target)`` with ``target[key]`` set aside, then put it back.

    Used around ``SanitizeBoundingBoxes``, which would index the H x W semantic map with the
    per-instance keep mask.
    """

    def __init__(self, transform: nn.Module, key: str) -> None:
        super().__init__()
        self.transform = transform
        self.key = key

    def forward(self, *inputs: Any) -> Any:
        image, target = _sample(inputs)
        if self.key not in target:
            return self.transform(image, target)
        rest = {k: v for k, v in target.items() if k != self.key}
        image, rest = self.transform(image, rest)
        rest[self.key] = target[self.key]
        return image, rest


class PadSemanticWithIgnore(nn.Module):
    """Run a padding ``transform`` so that pixels it pads into ``target[key]`` read ``IGNORE_INDEX``.

    torchvision pads every ``tv_tensors.Mask`` with one fill value, 0 for the instance masks. The
    semantic map is shifted by one (mod 256) on the way in and back on the way out: a padded 0 comes
    back as 255, and every label (255 included) comes back as itself.
    """

    def __init__(self, transform: nn.Module, key: str) -> None:
        super().__init__()
        self.transform = transform
        self.key = key

    def forward(self, *inputs: Any) -> Any:
        image, target = _sample(inputs)
        if self.key not in target:
            return self.transform(image, target)
        shifted = {**target, self.key: tv_tensors.wrap((target[self.key] + 1) % 256, like=target[self.key])}
        image, out = self.transform(image, shifted)
        out[self.key] = tv_tensors.wrap((out[self.key] + IGNORE_INDEX) % 256, like=out[self.key])
        return image, out


def _sample(inputs: tuple[Any, ...]) -> tuple[Any, dict[str, Any]]:
    """(image, target) from the positional inputs ``v2.Compose`` passes (unpacked or as one tuple)."""
    sample = inputs[0] if len(inputs) == 1 else inputs
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], dict)):
        raise TypeError(f"expected an (image, target dict) sample, got {type(sample).__name__}")
    return sample[0], sample[1]
