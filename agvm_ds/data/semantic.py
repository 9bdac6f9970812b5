"""Semantic segmentation data: images paired with single-channel label PNGs (ADE20K layout).

Why a dataset of our own: a large-batch run must fail at construction, naming the file, when a
label is missing, has the wrong size or is not an 8-bit index image, instead of crashing in a
worker hours later; and a label value outside the class list must be an error naming the file, not
a silent out-of-range index in the loss. Image sizes come from the file headers (nothing is
decoded at construction), so batches can be grouped by aspect ratio as for detection.

Sample format (``dataset[i]`` with ``transforms=None``)::

    image:  tv_tensors.Image, uint8, 3 x H x W (RGB)
    target: {
        "sem_seg":  tv_tensors.Mask, int64 H x W, class index 0..K-1 or IGNORE_INDEX (255),
        "image_id": int, the position of the image in the dataset,
    }
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from .coco import ImageReadError, read_rgb

__all__ = ["ADE20K_CLASSES", "IGNORE_INDEX", "SemanticSegmentation", "ade20k", "read_class_names"]

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Any, dict[str, Any]]]

#: Label value that the loss and the metrics skip.
IGNORE_INDEX = 255

#: Image file suffixes paired with labels (compared in lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")

#: PIL modes of a valid label PNG: 8-bit greyscale or palette indices.
LABEL_MODES: tuple[str, ...] = ("L", "P")

#: The 150 ADEChallengeData2016 classes in label order (label 1 in the PNGs is ``"wall"``), spelled as
#: mmsegmentation's ``ADE20KDataset`` spells them (including the trailing space of ``"bed "``), so
#: per-class results line up with published tables.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

ADE20K_SPLITS: tuple[str, ...] = ("training", "validation")


class SemanticSegmentation(torch.utils.data.Dataset):
    """Images in ``image_dir`` and their label PNGs ``label_dir/<stem>.png``, checked at construction.

    Args:
        image_dir: folder of ``*.jpg``, ``*.jpeg`` or ``*.png`` images (sorted by file name).
        label_dir: folder of one single-channel 8-bit PNG per image, same stem, same size.
        classes: class names; label value ``k`` means ``classes[k]``.
        transforms: called as ``transforms(image, target)`` (e.g. ``build_semantic_transforms``).
        reduce_zero_label: label 0 means "unlabelled" (ADE20K): 0 becomes 255 and every other value
            ``v`` becomes ``v - 1``; 255 stays 255.

    Attributes:
        classes, num_classes, ignore_index: the label space.
        files: (image path, label path) per sample.
        aspect_ratios: width / height per image, from the file headers.
        ids: ``0..N-1``; ``target["image_id"]`` of each sample.

    Raises:
        FileNotFoundError: a folder does not exist.
        ValueError: an image without a label or a label without an image, a label whose size differs
            from its image's, a label PNG that is not 8-bit single-channel (one line naming the files);
            on read, a label value that is neither a class index nor 255 (naming the file and value).
        ImageReadError: an image or label file that cannot be decoded (naming it).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        label_dir: str | os.PathLike,
        classes: Sequence[str],
        transforms: Transforms | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.label_dir = Path(label_dir)
        for what, folder in (("image", self.image_dir), ("label", self.label_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{what} folder not found: {folder}")
        self.classes: list[str] = list(classes)
        if not self.classes:
            raise ValueError(f"no classes given for {self.label_dir}")
        if len(self.classes) > IGNORE_INDEX:
            raise ValueError(f"{len(self.classes)} classes do not fit 8-bit labels below {IGNORE_INDEX}")
        self.num_classes = len(self.classes)
        self.ignore_index = IGNORE_INDEX
        self.transforms = transforms
        self.reduce_zero_label = reduce_zero_label

        self.files: list[tuple[Path, Path]] = _pair_files(self.image_dir, self.label_dir)
        self.aspect_ratios: list[float] = []
        for image_path, label_path in self.files:
            width, height = _check_pair(image_path, label_path)
            self.aspect_ratios.append(width / height)
        self.ids: list[int] = list(range(len(self.files)))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_path, label_path = self.files[index]
        image = read_rgb(image_path)
        label = read_label(label_path)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image {image_path} is "
                f"{image.shape[-1]}x{image.shape[-2]}"
            )
        label = self._map_labels(label, label_path)
        target: dict[str, Any] = {
            "sem_seg": tv_tensors.Mask(torch.from_numpy(label.astype(np.int64))),
            "image_id": self.ids[index],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _map_labels(self, label: np.ndarray, path: Path) -> np.ndarray:
        """Apply ``reduce_zero_label`` and check every value is a class index or the ignore index."""
        if self.reduce_zero_label:
            lut = np.arange(256, dtype=np.int64) - 1
            lut[0] = IGNORE_INDEX
            lut[IGNORE_INDEX] = IGNORE_INDEX
            label = lut[label]
        present = np.flatnonzero(np.bincount(label.reshape(-1), minlength=256))
        bad = [int(v) for v in present if v >= self.num_classes and v != IGNORE_INDEX]
        if bad:
            shift = " after reduce_zero_label" if self.reduce_zero_label else ""
            raise ValueError(
                f"{path}: label value {bad[0]}{shift} is not a class index (there are {self.num_classes} "
                f"classes, 0..{self.num_classes - 1}) nor the ignore index {IGNORE_INDEX}"
            )
        return label


def ade20k(root: str | os.PathLike, split: str, transforms: Transforms | None = None) -> SemanticSegmentation:
    """ADEChallengeData2016 under ``root``: ``images/<split>`` and ``annotations/<split>``, 150 classes.

    ``split`` is ``"training"`` or ``"validation"``; label 0 ("other") is ignored (``reduce_zero_label``).
    """
    if split not in ADE20K_SPLITS:
        raise ValueError(f"unknown ADE20K split {split!r}; valid splits: {', '.join(ADE20K_SPLITS)}")
    root = Path(root)
    return SemanticSegmentation(
        root / "images" / split, root / "annotations" / split, ADE20K_CLASSES, transforms, reduce_zero_label=True
    )


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file, one per line in label order (blank lines are skipped).

    Raises ValueError naming the file for an empty list, and the line for a duplicate name.
    """
    path = Path(path)
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in first_line:
            raise ValueError(f"{path}: line {number}: duplicate class name {name!r} (first on line {first_line[name]})")
        first_line[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no class names (expected one per line)")
    return names


def read_label(path: Path) -> np.ndarray:
    """The H x W uint8 values of a label PNG (palette indices for mode 'P'); errors name the file."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode in LABEL_MODES:
                return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise ImageReadError(f"cannot read label {path}: {type(exc).__name__}: {exc}") from exc
    raise ValueError(f"{path}: label PNG has PIL mode {mode!r}; expected 8-bit single-channel ('L' or 'P')")


def _pair_files(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    labels = {p.stem: p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    stems = {p.stem for p in images}
    if len(stems) != len(images):
        shared = sorted(p.name for p in images if sum(q.stem == p.stem for q in images) > 1)
        raise ValueError(f"{image_dir}: images {_listed(shared)} share a stem; labels cannot be paired")
    unlabelled = [p.name for p in images if p.stem not in labels]
    if unlabelled:
        raise ValueError(f"{label_dir}: no label PNG for image(s) {_listed(unlabelled)} of {image_dir}")
    orphans = sorted(p.name for stem, p in labels.items() if stem not in stems)
    if orphans:
        raise ValueError(f"{image_dir}: no image for label(s) {_listed(orphans)} of {label_dir}")
    if not images:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(p, labels[p.stem]) for p in images]


def _check_pair(image_path: Path, label_path: Path) -> tuple[int, int]:
    """(width, height) of the image, after checking its label's header: same size, 8-bit single-channel."""
    image_size, _ = _header(image_path, "image")
    label_size, mode = _header(label_path, "label")
    if mode not in LABEL_MODES:
        raise ValueError(
            f"{label_path}: label PNG has PIL mode {mode!r}; expected 8-bit single-channel ('L' or 'P')"
        )
    if label_size != image_size:
        raise ValueError(
            f"{label_path}: label is {label_size[0]}x{label_size[1]} but image {image_path} is "
            f"{image_size[0]}x{image_size[1]}"
        )
    return image_size


def _header(path: Path, what: str) -> tuple[tuple[int, int], str]:
    """(size, mode) from a file's header; PIL decodes no pixels here."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except Exception as exc:
        raise ImageReadError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc


def _listed(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
