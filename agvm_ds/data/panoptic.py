"""COCO panoptic segmentation data: instance targets for the things plus a semantic map of the stuff.

Why: Panoptic FPN trains a Mask R-CNN branch on the thing segments and a semantic branch on the
stuff; both targets come from one segment-id PNG per image (id = R + 256 G + 256^2 B, 0 = VOID) and
the ``segments_info`` of ``panoptic_*.json``. As :class:`~agvm_ds.data.coco.CocoDetection` does,
the file is checked at construction (one error line naming the file and the entry), so a bad
annotation stops a run before training starts.

Sample format (``dataset[i]`` with ``transforms=None``)::

    image:  tv_tensors.Image, uint8, 3 x H x W (RGB)
    target: {
        "boxes":    tv_tensors.BoundingBoxes, float32 N x 4, XYXY, the extent of each thing mask,
        "labels":   int64 N, contiguous thing labels 1..T (see ``contiguous_to_thing``),
        "masks":    tv_tensors.Mask, uint8 N x H x W,
        "area":     float32 N, pixels of each mask,
        "iscrowd":  int64 N, zeros (crowd things are not instance targets),
        "sem_seg":  tv_tensors.Mask, int64 H x W: stuff -> contiguous stuff label 1..S,
                    thing pixels (crowd or not) -> 0, VOID -> 255,
        "image_id": int,
    }

The N instances are the non-crowd thing segments with a non-empty mask, in ``segments_info`` order.
The panoptic evaluator reads the untouched ground truth through :meth:`CocoPanoptic.gt_segments`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from .coco import ImageReadError, _check_entries, _is_int, _is_name, read_coco_json, read_rgb

__all__ = ["CocoPanoptic", "VOID_ID", "read_segment_ids"]

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]

#: Segment id of unlabelled pixels in a panoptic PNG.
VOID_ID = 0
_IGNORE = 255


class CocoPanoptic(torch.utils.data.Dataset):
    """Images, panoptic PNGs and ``panoptic_*.json``, validated at construction.

    Args:
        image_dir: folder of the images (``images[].file_name`` is relative to it).
        ann_file: ``panoptic_*.json``.
        mask_dir: folder of the segment-id PNGs (``annotations[].file_name``); defaults to
            ``ann_file`` without ``.json`` (COCO's ``annotations/panoptic_val2017/``).
        transforms: called as ``transforms(image, target)`` (e.g. ``build_panoptic_transforms``).

    Attributes:
        categories: ``{"id", "name", "isthing"}`` per category, sorted by id.
        thing_ids, stuff_ids: sorted category ids.
        thing_to_contiguous / contiguous_to_thing: thing category id <-> 1..T (``num_things``).
        stuff_to_contiguous / contiguous_to_stuff: stuff category id <-> 1..S (``num_stuff``).
        ids: image ids in JSON order.
        aspect_ratios: width / height per image, from the JSON.

    Raises:
        FileNotFoundError: ``ann_file``, ``image_dir``, ``mask_dir`` or an annotation's PNG is missing.
        ValueError: malformed JSON or entries (naming the file and the entry); on read, a PNG whose size
            differs from its image's or that holds a segment id absent from ``segments_info``.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        mask_dir: str | os.PathLike | None = None,
        transforms: Transforms | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.mask_dir = Path(mask_dir) if mask_dir is not None else self.ann_file.with_suffix("")
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO panoptic annotation file not found: {self.ann_file}")
        for what, folder in (("image", self.image_dir), ("panoptic PNG", self.mask_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder not found: {folder}")
        self.transforms = transforms

        data = _read_panoptic(self.ann_file)
        self.categories: list[dict[str, Any]] = sorted(
            ({"id": c["id"], "name": c["name"], "isthing": int(c["isthing"])} for c in data["categories"]),
            key=lambda c: c["id"],
        )
        self.thing_ids: list[int] = [c["id"] for c in self.categories if c["isthing"]]
        self.stuff_ids: list[int] = [c["id"] for c in self.categories if not c["isthing"]]
        self.thing_to_contiguous: dict[int, int] = {c: i + 1 for i, c in enumerate(self.thing_ids)}
        self.stuff_to_contiguous: dict[int, int] = {c: i + 1 for i, c in enumerate(self.stuff_ids)}
        self.contiguous_to_thing: dict[int, int] = {i: c for c, i in self.thing_to_contiguous.items()}
        self.contiguous_to_stuff: dict[int, int] = {i: c for c, i in self.stuff_to_contiguous.items()}
        self.num_things = len(self.thing_ids)
        self.num_stuff = len(self.stuff_ids)

        self.images: dict[int, dict[str, Any]] = {img["id"]: img for img in data["images"]}
        self.annotations: dict[int, dict[str, Any]] = _index_annotations(
            self.ann_file, data, self.images, {c["id"] for c in self.categories}
        )
        for ann in self.annotations.values():
            if not (self.mask_dir / ann["file_name"]).is_file():
                raise FileNotFoundError(
                    f"{self.ann_file}: annotation of image id {ann['image_id']}: panoptic PNG "
                    f"{self.mask_dir / ann['file_name']} not found"
                )
        self.ids: list[int] = [img["id"] for img in data["images"]]
        self.aspect_ratios: list[float] = [self.images[i]["width"] / self.images[i]["height"] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        image = read_rgb(path)
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: image is {width}x{height} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (image id {image_id})"
            )
        segment_ids, segments = self.gt_segments(image_id)
        target = self._target(segment_ids, segments)
        target["image_id"] = int(image_id)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def gt_segments(self, image_id: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The segment-id map (H x W int64, 0 = VOID) of ``image_id`` and its ``segments_info`` from the JSON.

        Raises ValueError naming the PNG when its size differs from the image's or it holds a segment
        id that ``segments_info`` does not list.
        """
        info = self.images[image_id]
        ann = self.annotations[image_id]
        png = self.mask_dir / ann["file_name"]
        segment_ids = read_segment_ids(png)
        if segment_ids.shape != (info["height"], info["width"]):
            raise ValueError(
                f"{png}: panoptic PNG is {segment_ids.shape[1]}x{segment_ids.shape[0]} but image "
                f"{info['file_name']} (id {image_id}) is {info['width']}x{info['height']}"
            )
        listed = {s["id"] for s in ann["segments_info"]}
        unknown = [int(v) for v in np.unique(segment_ids) if v != VOID_ID and int(v) not in listed]
        if unknown:
            raise ValueError(
                f"{png}: segment id {unknown[0]} is in the PNG but not in the segments_info of image id "
                f"{image_id} in {self.ann_file}"
            )
        return segment_ids, [dict(s) for s in ann["segments_info"]]

    def _target(self, segment_ids: np.ndarray, segments: list[dict[str, Any]]) -> dict[str, Any]:
        height, width = segment_ids.shape
        present, inverse = np.unique(segment_ids, return_inverse=True)
        inverse = inverse.reshape(height, width)
        position = {int(v): k for k, v in enumerate(present)}
        semantic_lut = np.full(len(present), _IGNORE, dtype=np.int64)
        masks, labels = [], []
        for seg in segments:
            k = position.get(seg["id"])
            if seg["category_id"] in self.stuff_to_contiguous:
                if k is not None:
                    semantic_lut[k] = self.stuff_to_contiguous[seg["category_id"]]
                continue
            if k is None:  # a thing segment with no pixel: not a target
                continue
            semantic_lut[k] = 0
            if not seg.get("iscrowd", 0):
                masks.append(inverse == k)
                labels.append(self.thing_to_contiguous[seg["category_id"]])
        mask_array = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                _mask_boxes(mask_array), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(mask_array.astype(np.uint8))),
            "area": torch.from_numpy(mask_array.sum(axis=(1, 2)).astype(np.float32)),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
            "sem_seg": tv_tensors.Mask(torch.from_numpy(semantic_lut[inverse])),
        }


def read_segment_ids(path: Path) -> np.ndarray:
    """H x W int64 segment ids (R + 256 G + 256^2 B) of a panoptic PNG; errors name the file."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"panoptic PNG not found: {path}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise ImageReadError(f"cannot read panoptic PNG {path}: {type(exc).__name__}: {exc}") from exc
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _mask_boxes(masks: np.ndarray) -> torch.Tensor:
    """XYXY float32 boxes (N x 4) spanning each mask's pixels; x1, y1 are one past the last pixel."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return torch.from_numpy(boxes)


def _read_panoptic(ann_file: Path) -> dict[str, Any]:
    """The json of a COCO panoptic file, its images and categories checked (one line naming file and entry)."""
    data = read_coco_json(ann_file, "panoptic")
    _check_entries(ann_file, data["categories"], "category", {"id": _is_int, "name": _is_name, "isthing": _is_flag})
    return data


def _index_annotations(
    ann_file: Path, data: dict[str, Any], images: dict[int, dict[str, Any]], category_ids: set[int]
) -> dict[int, dict[str, Any]]:
    """Annotation per image id, after checking each one and its segments; every image must have one."""
    by_image: dict[int, dict[str, Any]] = {}
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{ann_file}: annotations[{index}] is not a JSON object")
        image_id = ann.get("image_id")
        where = f"annotations[{index}] (image id {image_id})"
        if image_id not in images:
            raise ValueError(f"{ann_file}: {where} refers to an image id that is not in 'images'")
        if image_id in by_image:
            raise ValueError(f"{ann_file}: {where} is the second annotation of that image")
        if not _is_name(ann.get("file_name")):
            raise ValueError(f"{ann_file}: {where} has no valid 'file_name': {ann.get('file_name')!r}")
        segments = ann.get("segments_info")
        if not isinstance(segments, list):
            raise ValueError(f"{ann_file}: {where} has no 'segments_info' list")
        _check_segments(ann_file, where, segments, category_ids)
        by_image[image_id] = ann
    missing = [i for i in images if i not in by_image]
    if missing:
        raise ValueError(f"{ann_file}: image id {missing[0]} ({images[missing[0]]['file_name']}) has no annotation")
    return by_image


def _check_segments(ann_file: Path, where: str, segments: list[Any], category_ids: set[int]) -> None:
    seen: set[int] = set()
    for position, seg in enumerate(segments):
        if not isinstance(seg, dict):
            raise ValueError(f"{ann_file}: {where}: segments_info[{position}] is not a JSON object")
        seg_id = seg.get("id")
        if not _is_int(seg_id) or not 0 < seg_id < 256**3:
            raise ValueError(f"{ann_file}: {where}: segments_info[{position}] has an invalid 'id': {seg_id!r}")
        if seg_id in seen:
            raise ValueError(f"{ann_file}: {where}: duplicate segment id {seg_id}")
        seen.add(seg_id)
        if seg.get("category_id") not in category_ids:
            raise ValueError(
                f"{ann_file}: {where}: segment id {seg_id} has unknown category id {seg.get('category_id')!r}"
            )
        if not _is_flag(seg.get("iscrowd", 0)):
            raise ValueError(f"{ann_file}: {where}: segment id {seg_id} has an invalid 'iscrowd': {seg['iscrowd']!r}")


def _is_flag(value: Any) -> bool:
    """0, 1, True or False (COCO writes ``isthing`` and ``iscrowd`` as 0/1)."""
    return isinstance(value, (bool, int)) and value in (0, 1)
