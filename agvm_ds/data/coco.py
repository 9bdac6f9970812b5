"""COCO detection / instance-segmentation dataset in torchvision's detection format.

Why a dataset of our own instead of ``torchvision.datasets.CocoDetection``: a large-batch run
must fail at construction, on rank 0 and with the annotation id, when the annotation file is bad,
instead of producing NaN losses hours later; it must map COCO's sparse category ids to the
contiguous labels torchvision's heads want (and back, for evaluation); and it must expose image
sizes without reading images so batches can be grouped by aspect ratio.

Sample format (``dataset[i]`` with ``transforms=None``)::

    image:  tv_tensors.Image, uint8, 3 x H x W (RGB). uint8 keeps worker->main transfers 4x
            smaller and resizing cheap; ``build_transforms`` ends with ToDtype(float32, scale=True),
            giving the [0, 1] floats torchvision detectors expect.
    target: {
        "boxes":    tv_tensors.BoundingBoxes, float32, N x 4, XYXY in pixels, canvas (H, W),
        "labels":   int64 N, contiguous 1..K (0 is background), see ``contiguous_to_category_id``,
        "masks":    tv_tensors.Mask, uint8 N x H x W (only with ``with_masks=True``),
        "image_id": int, the COCO image id,
        "area":     float32 N, COCO "area" of the annotation (original pixels, not updated by
                    transforms),
        "iscrowd":  int64 N (all zero: crowd regions are not training targets),
    }

Crowd annotations (``iscrowd=1``) are left out of the targets, as torchvision's references do,
but stay in :attr:`CocoDetection.coco`, the ground truth handed to the evaluator, where COCOeval
uses them as "ignore" regions.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

__all__ = [
    "EIGHT_BIT_MODES", "SIXTEEN_BIT_MODES", "CocoDetection", "ImageReadError", "decode_segmentation", "read_rgb",
]

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]

_MAX_LISTED = 10  # invalid annotations named in one error message


class ImageReadError(OSError):
    """An image file exists but cannot be decoded; the message names the file."""


class CocoDetection(torch.utils.data.Dataset):
    """Images and instance targets from a COCO json, validated at construction.

    Args:
        image_dir: folder holding the images (``file_name`` in the json is relative to it).
        ann_file: COCO ``instances_*.json``.
        transforms: called as ``transforms(image, target)`` (e.g. :func:`build_transforms`).
        with_masks: decode instance masks (polygon and RLE) into ``target["masks"]``.
        skip_invalid: drop invalid annotations with one warning instead of raising.
        remove_empty: leave out images with no non-crowd annotation (useful for training only;
            evaluation must see every image).

    Attributes:
        coco: the pycocotools ``COCO`` ground truth (minus dropped invalid annotations).
        ids: COCO image ids in dataset order.
        contiguous_to_category_id / category_id_to_contiguous: label mapping (sorted ids -> 1..K).
        num_classes: K, the number of categories (a torchvision model wants ``K + 1``).
        aspect_ratios: width / height of each image, from the json (no image is read).

    Raises:
        FileNotFoundError: ``ann_file`` or ``image_dir`` does not exist.
        ValueError: a file that is not valid JSON, an image entry without a unique ``id``, a
            ``file_name`` or a positive ``width``/``height``, a duplicate category id (one line naming
            the file and the entry); invalid annotations (see :meth:`_find_invalid`), naming the
            annotation file, the image file and the annotation id.

    Images are read as 8-bit RGB from any of :data:`EIGHT_BIT_MODES` and :data:`SIXTEEN_BIT_MODES`
    (16-bit greyscale is scaled, not clipped); another mode raises :class:`ImageReadError` naming it.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Transforms | None = None,
        with_masks: bool = False,
        skip_invalid: bool = False,
        remove_empty: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.transforms = transforms
        self.with_masks = with_masks

        data = _read_instances(self.ann_file)
        invalid = self._find_invalid(data)
        if invalid:
            if not skip_invalid:
                lines = [f"  {msg}" for _, msg in invalid[:_MAX_LISTED]]
                more = len(invalid) - _MAX_LISTED
                if more > 0:
                    lines.append(f"  ... and {more} more")
                raise ValueError(
                    f"{self.ann_file}: {len(invalid)} invalid annotation(s) "
                    f"(pass skip_invalid=True to drop them):\n" + "\n".join(lines)
                )
            dropped = {index for index, _ in invalid}
            warnings.warn(
                f"{self.ann_file}: dropped {len(dropped)} invalid annotation(s), ids "
                f"{[data['annotations'][i].get('id') for i in sorted(dropped)]}",
                stacklevel=2,
            )
            data["annotations"] = [a for i, a in enumerate(data["annotations"]) if i not in dropped]

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()

        category_ids = sorted(self.coco.cats)
        self.contiguous_to_category_id: dict[int, int] = {i + 1: c for i, c in enumerate(category_ids)}
        self.category_id_to_contiguous: dict[int, int] = {c: i for i, c in self.contiguous_to_category_id.items()}
        self.num_classes = len(category_ids)

        ids = [img["id"] for img in data["images"]]
        if remove_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        self.ids: list[int] = ids
        self.aspect_ratios: list[float] = [
            self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids
        ]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = read_rgb(path)
        height, width = image.shape[-2:]
        if (height, width) != (info["height"], info["width"]):
            raise ValueError(
                f"{path}: image is {width}x{height} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (image id {image_id})"
            )
        target = self._target(image_id, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _target(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(
                [self.category_id_to_contiguous[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "image_id": int(image_id),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for k, a in enumerate(anns):
                masks[k] = decode_segmentation(a["segmentation"], height, width)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return target

    def _find_invalid(self, data: dict[str, Any]) -> list[tuple[int, str]]:
        """(position, message) of every annotation that would make a bad training target.

        Invalid: unknown image id or category id, a duplicate annotation id, a box that is not 4
        finite numbers, has w <= 0 or h <= 0, or lies outside the image by more than one pixel,
        and (with masks) a missing segmentation.
        """
        images = {img["id"]: img for img in data["images"]}
        categories = {c["id"] for c in data["categories"]}
        seen: Counter[Any] = Counter()
        problems: list[tuple[int, str]] = []
        for index, ann in enumerate(data["annotations"]):
            ann_id = ann.get("id")
            seen[ann_id] += 1
            img = images.get(ann.get("image_id"))
            where = f"annotation id {ann_id}, image " + (
                f"{img['file_name']} (id {img['id']})" if img else f"id {ann.get('image_id')} (not in the file)"
            )
            if img is None:
                reason = "refers to a missing image id"
            elif seen[ann_id] > 1:
                reason = "duplicate annotation id"
            elif ann.get("category_id") not in categories:
                reason = f"unknown category id {ann.get('category_id')}"
            else:
                reason = self._box_problem(ann.get("bbox"), img)
                if reason is None and self.with_masks and not ann.get("segmentation"):
                    reason = "no segmentation (needed with with_masks=True)"
            if reason is not None:
                problems.append((index, f"{where}: {reason}"))
        return problems

    @staticmethod
    def _box_problem(bbox: Any, img: dict[str, Any]) -> str | None:
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            return f"bbox {bbox!r} is not [x, y, w, h]"
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            return f"bbox {bbox!r} is not numeric"
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            return f"bbox {bbox} is not finite"
        if w <= 0 or h <= 0:
            return f"bbox {bbox} has non-positive width or height"
        width, height = img["width"], img["height"]
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            return f"bbox {bbox} lies outside the {width}x{height} image by more than one pixel"
        if min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
            return f"bbox {bbox} has no area inside the {width}x{height} image"
        return None


def read_coco_json(ann_file: Path, kind: str) -> dict[str, Any]:
    """A COCO ``kind`` ("instances", "panoptic") JSON file with its ``images``, ``annotations`` and
    ``categories`` lists and its image entries checked; one error line names the file and entry."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{ann_file}: not a valid JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file}: not a COCO {kind} file (the top level is not a JSON object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: not a COCO {kind} file (no '{key}' list)")
    _check_entries(ann_file, data["images"], "image", {"id": _is_int, "file_name": _is_name,
                                                        "width": _is_size, "height": _is_size})
    return data


def _read_instances(ann_file: Path) -> dict[str, Any]:
    """The json of a COCO instances file, its structure checked: one error line names the file and entry.

    Per-annotation problems are left to :meth:`CocoDetection._find_invalid` (they can be skipped);
    a malformed file, or an image or category entry that is not what COCO says, cannot be.
    """
    data = read_coco_json(ann_file, "instances")
    _check_entries(ann_file, data["categories"], "category", {"id": _is_int})
    for index, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{ann_file}: annotations[{index}] is not a JSON object")
    return data


def _check_entries(ann_file: Path, entries: list[Any], what: str, fields: dict[str, Callable[[Any], bool]]) -> None:
    """Every entry is an object whose ``fields`` pass their check, and ids are unique."""
    first_at: dict[int, int] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{ann_file}: {what} entry {index} is not a JSON object")
        where = f"{what} id {entry['id']}" if "id" in entry else f"{what} entry {index}"
        for key, valid in fields.items():
            if key not in entry:
                raise ValueError(f"{ann_file}: {where} has no '{key}'")
            if not valid(entry[key]):
                raise ValueError(f"{ann_file}: {where} has an invalid '{key}': {entry[key]!r}")
        if entry["id"] in first_at:
            raise ValueError(
                f"{ann_file}: duplicate {what} id {entry['id']} ({what} entries {first_at[entry['id']]} and {index})"
            )
        first_at[entry["id"]] = index


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_size(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an H x W uint8 mask."""
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:  # compressed RLE; counts may be str (from json) or bytes
        rle = segmentation
    return mask_utils.decode(rle)


#: PIL modes read as 8-bit RGB: 8-bit modes through PIL's own conversion (alpha dropped, as
#: torchvision's ``read_image(mode=RGB)`` and detectron2 do; a palette with transparency through
#: RGBA), 16-bit greyscale (PNG) scaled by 255 / 65535 (not clipped).
EIGHT_BIT_MODES: tuple[str, ...] = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK")
SIXTEEN_BIT_MODES: tuple[str, ...] = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_rgb(path: Path) -> tv_tensors.Image:
    """Decode an image file to a 3 x H x W uint8 RGB tensor; errors name the file (even in workers)."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in EIGHT_BIT_MODES or mode in SIXTEEN_BIT_MODES:
                array = _rgb_array(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
    if mode not in EIGHT_BIT_MODES and mode not in SIXTEEN_BIT_MODES:
        raise ImageReadError(
            f"cannot read image {path}: PIL mode {mode!r} is not supported; "
            f"supported modes are {', '.join(EIGHT_BIT_MODES + SIXTEEN_BIT_MODES)}"
        )
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))


def _rgb_array(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 of an image in one of the supported modes."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)  # I;16B arrives big-endian, I as int32
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ValueError(f"mode {img.mode!r} values in [{values.min()}, {values.max()}], outside 16 bits")
        grey = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.array(img.convert("RGB"))
