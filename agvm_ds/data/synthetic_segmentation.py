"""Deterministic synthetic semantic and panoptic segmentation sets, generated on demand.

Why: the semantic and panoptic training, resume and evaluation paths need files in the real formats
(JPEGs with label PNGs and a class list; COCO panoptic JSON with segment-id PNGs) that a test or a
CPU smoke run creates in seconds and that a tiny segmenter learns in minutes.

What is in a scene (both sets draw the same scenes, so a semantic and a panoptic set with the same
parameters show the same images):

- "stuff": horizontal bands with wavy, irregular boundaries: ``sky`` (smooth gradient with soft
  clouds), ``grass`` (green, grainy vertical blades), ``water`` (blue, fine horizontal ripples) and
  ``wall`` (bricks and mortar), each drawn from a colour range of its own; 2-3 bands per image, sky
  or wall on top. Texture and colour statistics tell them apart;
- "things": the four shapes of :mod:`~agvm_ds.data.synthetic` (circle, square, triangle, star), 1-5
  per image, non-overlapping, painted in a random colour that stands out from what is underneath:
  the shape tells the class, the colour does not. Every 16th image (``index % 16 == 5``) has none,
  and every 16th (``index % 16 == 10``) also holds a crowd region (a packed cluster of small circles
  or squares);
- one-pixel lines along the boundaries between stuff bands are unlabelled: 255 in the semantic
  labels, VOID (id 0) in the panoptic PNGs.

Semantic set: ``images/{train,val}/<id:012d>.jpg``, ``labels/{train,val}/<id:012d>.png`` (mode "L",
value = index in ``classes.txt``: the 4 stuff classes, then the 4 shapes; 255 = ignore; a crowd
region is labelled with its shape), ``classes.txt``.

Panoptic set: ``images/{train,val}/<id:012d>.jpg``, ``annotations/panoptic_{train,val}.json`` and
``annotations/panoptic_{train,val}/<id:012d>.png`` (id = R + 256 G + 256^2 B). Things keep the COCO
set's sparse ids (1, 3, 5, 7, ``isthing=1``); stuff gets 10, 12, 14, 16 (``isthing=0``). Each shape
is its own segment, each stuff class one segment per image, a crowd region one ``iscrowd=1`` segment.

Determinism and reuse work as in :func:`~agvm_ds.data.synthetic.make_synthetic_coco`: one RNG per
image, fixed file settings, a stamp of the parameters (its own per set, so the sets live under
different roots) and a file lock for concurrent callers.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..seeding import synthetic_image_rng
from .synthetic import (
    CATEGORIES,
    _canvas_size,
    _claim,
    _crowd_region,
    _file_name,
    _finish,
    _is_complete,
    _locked,
    _paint,
    _place_shape,
    _write_json,
)

__all__ = [
    "PANOPTIC_CATEGORIES",
    "SEMANTIC_CLASSES",
    "STUFF_CLASSES",
    "SyntheticPanopticPaths",
    "SyntheticSemanticPaths",
    "make_synthetic_panoptic",
    "make_synthetic_semantic",
]

#: Bump when the drawing code changes, so existing stamped sets are regenerated.
GENERATOR_VERSION = 1

STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "wall")
_SHAPES: tuple[str, ...] = tuple(c["name"] for c in CATEGORIES)
#: Semantic label order: stuff first, then the shapes.
SEMANTIC_CLASSES: tuple[str, ...] = STUFF_CLASSES + _SHAPES
_STUFF_IDS = (10, 12, 14, 16)
PANOPTIC_CATEGORIES: tuple[dict[str, Any], ...] = tuple(
    {"id": c["id"], "name": c["name"], "supercategory": "shape", "isthing": 1} for c in CATEGORIES
) + tuple({"id": i, "name": n, "supercategory": "scene", "isthing": 0} for i, n in zip(_STUFF_IDS, STUFF_CLASSES))
_THING_ID = {c["name"]: c["id"] for c in CATEGORIES}
_SHAPE_OF_ID = {c["id"]: c["name"] for c in CATEGORIES}

_IGNORE = 255
_SPLIT_CODE = {"train": 10, "val": 11}  # apart from the COCO set's streams
_NO_THINGS_EVERY, _NO_THINGS_AT, _CROWD_AT = 16, 5, 10
_JPEG_QUALITY = 92


@dataclass(frozen=True)
class SyntheticSemanticPaths:
    """Where :func:`make_synthetic_semantic` put the two splits and the class list."""

    root: Path
    train_images: Path
    train_labels: Path
    val_images: Path
    val_labels: Path
    classes_file: Path


@dataclass(frozen=True)
class SyntheticPanopticPaths:
    """Where :func:`make_synthetic_panoptic` put the two splits (images, JSON, segment-id PNGs)."""

    root: Path
    train_images: Path
    train_ann: Path
    train_masks: Path
    val_images: Path
    val_ann: Path
    val_masks: Path


@dataclass
class _Scene:
    pixels: np.ndarray  # H x W x 3 uint8
    stuff: np.ndarray  # H x W int64, index into STUFF_CLASSES
    void: np.ndarray  # H x W bool, unlabelled stuff boundaries (things painted over them are labelled)
    things: list[tuple[np.ndarray, str, int]]  # (H x W uint8 mask, shape name, iscrowd), non-overlapping


def make_synthetic_semantic(
    root: str | os.PathLike, num_train: int = 600, num_val: int = 100, image_size: int = 192, seed: int = 0
) -> SyntheticSemanticPaths:
    """Create (or reuse) the synthetic semantic set under ``root`` and return its paths.

    ``image_size`` is the longer image side (at least 64). 700 images take a few seconds. Like
    ``make_synthetic_coco``, regeneration deletes only folders a previous call stamped as its own.
    """
    params = _params(num_train, num_val, image_size, seed)
    root = Path(root)
    paths = SyntheticSemanticPaths(
        root=root,
        train_images=root / "images" / "train",
        train_labels=root / "labels" / "train",
        val_images=root / "images" / "val",
        val_labels=root / "labels" / "val",
        classes_file=root / "classes.txt",
    )
    stamp = "synthetic_semantic_stamp.json"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".synthetic_semantic.lock"):
        files = [paths.classes_file]
        for folder, labels, count in ((paths.train_images, paths.train_labels, num_train),
                                      (paths.val_images, paths.val_labels, num_val)):
            files += [folder / _file_name(i + 1) for i in range(count)]
            files += [labels / _label_name(i + 1) for i in range(count)]
        if _is_complete(root / stamp, params, files):
            return paths
        _claim(root, params, stamp, ("images", "labels"), "make_synthetic_semantic")
        _write_semantic_split("train", num_train, paths.train_images, paths.train_labels, image_size, seed)
        _write_semantic_split("val", num_val, paths.val_images, paths.val_labels, image_size, seed)
        paths.classes_file.write_text("".join(f"{name}\n" for name in SEMANTIC_CLASSES), encoding="utf-8")
        _write_json(root / stamp, {**params, "complete": True})
    return paths


def make_synthetic_panoptic(
    root: str | os.PathLike, num_train: int = 600, num_val: int = 100, image_size: int = 192, seed: int = 0
) -> SyntheticPanopticPaths:
    """Create (or reuse) the synthetic COCO-panoptic set under ``root`` and return its paths.

    ``image_size`` is the longer image side (at least 64); image ids are ``1..num_train`` and
    ``1..num_val``. Readable by :class:`~agvm_ds.data.panoptic.CocoPanoptic` with its default ``mask_dir``.
    """
    params = _params(num_train, num_val, image_size, seed)
    root = Path(root)
    paths = SyntheticPanopticPaths(
        root=root,
        train_images=root / "images" / "train",
        train_ann=root / "annotations" / "panoptic_train.json",
        train_masks=root / "annotations" / "panoptic_train",
        val_images=root / "images" / "val",
        val_ann=root / "annotations" / "panoptic_val.json",
        val_masks=root / "annotations" / "panoptic_val",
    )
    stamp = "synthetic_panoptic_stamp.json"
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".synthetic_panoptic.lock"):
        files = [paths.train_ann, paths.val_ann]
        for folder, masks, count in ((paths.train_images, paths.train_masks, num_train),
                                     (paths.val_images, paths.val_masks, num_val)):
            files += [folder / _file_name(i + 1) for i in range(count)]
            files += [masks / _label_name(i + 1) for i in range(count)]
        if _is_complete(root / stamp, params, files):
            return paths
        _claim(root, params, stamp, ("images", "annotations"), "make_synthetic_panoptic")
        _write_panoptic_split("train", num_train, paths.train_images, paths.train_ann, paths.train_masks,
                              image_size, seed)
        _write_panoptic_split("val", num_val, paths.val_images, paths.val_ann, paths.val_masks, image_size, seed)
        _write_json(root / stamp, {**params, "complete": True})
    return paths


def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict[str, Any]:
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    return {"version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed}


def _label_name(image_id: int) -> str:
    return f"{image_id:012d}.png"


# ----------------------------------------------------------------------------------------------
# Writing


def _write_semantic_split(split: str, count: int, images: Path, labels: Path, image_size: int, seed: int) -> None:
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene = _draw_scene(synthetic_image_rng(seed, _SPLIT_CODE[split], index), index, image_size)
        label = scene.stuff.astype(np.uint8)
        label[scene.void] = _IGNORE
        for mask, shape, _ in scene.things:
            label[mask.astype(bool)] = len(STUFF_CLASSES) + _SHAPES.index(shape)
        Image.fromarray(scene.pixels).save(images / _file_name(index + 1), format="JPEG", quality=_JPEG_QUALITY)
        Image.fromarray(label, mode="L").save(labels / _label_name(index + 1), format="PNG")


def _write_panoptic_split(
    split: str, count: int, images_dir: Path, ann_path: Path, masks_dir: Path, image_size: int, seed: int
) -> None:
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image_id = index + 1
        scene = _draw_scene(synthetic_image_rng(seed, _SPLIT_CODE[split], index), index, image_size)
        height, width = scene.stuff.shape
        segment_ids, segments = _panoptic_segments(scene)
        Image.fromarray(scene.pixels).save(images_dir / _file_name(image_id), format="JPEG", quality=_JPEG_QUALITY)
        rgb = np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(masks_dir / _label_name(image_id), format="PNG")
        images.append({"id": image_id, "file_name": _file_name(image_id), "height": height, "width": width})
        annotations.append({"image_id": image_id, "file_name": _label_name(image_id), "segments_info": segments})
    info = {
        "description": f"agvm_ds synthetic panoptic scenes ({split})",
        "version": str(GENERATOR_VERSION),
        "seed": seed,
        "image_size": image_size,
    }
    _write_json(ann_path, {"info": info, "licenses": [], "images": images, "annotations": annotations,
                           "categories": [dict(c) for c in PANOPTIC_CATEGORIES]})


def _panoptic_segments(scene: _Scene) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The H x W segment-id map and its ``segments_info``: stuff segments first, then things."""
    segment_ids = np.zeros(scene.stuff.shape, dtype=np.int64)
    regions: list[tuple[np.ndarray, int, int]] = []  # (bool mask, category id, iscrowd)
    covered = scene.void.copy()
    for mask, _, _ in scene.things:
        covered |= mask.astype(bool)
    for k, category_id in enumerate(_STUFF_IDS):
        regions.append(((scene.stuff == k) & ~covered, category_id, 0))
    for mask, shape, iscrowd in scene.things:
        regions.append((mask.astype(bool), _THING_ID[shape], iscrowd))
    segments = []
    for mask, category_id, iscrowd in regions:
        if not mask.any():
            continue
        seg_id = (len(segments) + 1) * 65793  # 0x010101: every channel of the PNG carries the id
        segment_ids[mask] = seg_id
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        segments.append({"id": seg_id, "category_id": category_id, "iscrowd": iscrowd,
                         "bbox": bbox, "area": int(mask.sum())})
    return segment_ids, segments


# ----------------------------------------------------------------------------------------------
# Drawing


def _draw_scene(rng: np.random.Generator, index: int, image_size: int) -> _Scene:
    height, width = _canvas_size(rng, image_size)
    stuff = _stuff_layout(rng, height, width)
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    for k in np.unique(stuff):
        region = stuff == k
        canvas[region] = _TEXTURES[STUFF_CLASSES[k]](rng, height, width)[region]
    void = _boundaries(stuff)
    things: list[tuple[np.ndarray, str, int]] = []
    if index % _NO_THINGS_EVERY == _NO_THINGS_AT:
        return _Scene(_finish(rng, canvas), stuff, void, things)
    taken: list[tuple[float, float, float, float]] = []
    if index % _NO_THINGS_EVERY == _CROWD_AT:
        crowd = _crowd_region(rng, height, width, image_size)
        if crowd is not None:
            mask, category_id, box = crowd
            _paint(rng, canvas, mask)
            taken.append(box)
            things.append((mask, _SHAPE_OF_ID[category_id], 1))
    for _ in range(int(rng.integers(1, 6))):
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        placed = _place_shape(rng, shape, height, width, image_size, taken)
        if placed is None:
            continue
        mask, _, box = placed
        if not mask.any():
            continue
        _paint(rng, canvas, mask)
        taken.append(box)
        things.append((mask, shape, 0))
    return _Scene(_finish(rng, canvas), stuff, void, things)


def _stuff_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H x W stuff indices: 2-3 horizontal bands (sky or wall on top) split by wavy boundaries."""
    top = "sky" if rng.random() < 0.75 else "wall"
    bottom = "grass" if rng.random() < 0.5 else "water"
    bands = [top, bottom]
    middle = [s for s in ("wall", "water", "grass") if s not in bands]
    if rng.random() < 0.5:
        bands.insert(1, middle[int(rng.integers(len(middle)))])
    xs = np.arange(width, dtype=np.float32)
    layout = np.zeros((height, width), dtype=np.int64)
    rows = np.arange(height, dtype=np.float32)[:, None]
    previous = np.zeros(width, dtype=np.float32)
    for k in range(1, len(bands)):
        level = (k / len(bands) + rng.uniform(-0.08, 0.08)) * height
        edge = level + np.zeros(width, dtype=np.float32)
        for _ in range(2):  # two waves of random period, amplitude and phase
            period = rng.uniform(0.3, 1.2) * width
            edge += rng.uniform(0.02, 0.07) * height * np.sin(2 * math.pi * xs / period + rng.uniform(0, 2 * math.pi))
        edge = np.maximum(edge, previous + 2)
        layout[rows >= edge[None, :]] = k
        previous = edge
    return np.asarray([STUFF_CLASSES.index(b) for b in bands], dtype=np.int64)[layout]


def _boundaries(stuff: np.ndarray) -> np.ndarray:
    """Pixels just above or left of a change of stuff class (one-pixel lines)."""
    edge = np.zeros(stuff.shape, dtype=bool)
    edge[:-1] |= stuff[:-1] != stuff[1:]
    edge[:, :-1] |= stuff[:, :-1] != stuff[:, 1:]
    return edge


def _colour(rng: np.random.Generator, low: tuple[int, int, int], high: tuple[int, int, int]) -> np.ndarray:
    return rng.uniform(low, high).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]) -> np.ndarray:
    """H x W float32 in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(0, 1, size=cells).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.BILINEAR))


def _sky(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth: a vertical gradient, lighter downwards, with soft whitish clouds."""
    base = _colour(rng, (80, 140, 200), (160, 210, 255))
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    sky = base + t * np.float32(rng.uniform(15, 45))
    clouds = np.clip(_smooth_noise(rng, height, width, (3, 5)) * 1.6 - 0.8, 0, 1)[..., None]
    return sky + clouds * (np.float32(245) - sky)


def _grass(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grainy: green with short vertical blades (noise stretched 4x vertically)."""
    base = _colour(rng, (40, 110, 25), (110, 185, 80))
    blades = rng.normal(0, 28, size=(max(1, height // 4), width)).astype(np.float32)
    blades = np.repeat(blades, 4, axis=0)[:height]
    if len(blades) < height:
        blades = np.pad(blades, ((0, height - len(blades)), (0, 0)), mode="edge")
    return base + blades[..., None] * np.float32([0.6, 1.0, 0.4])


def _water(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Rippled: blue with fine horizontal waves (4-9 px period) that wobble sideways."""
    base = _colour(rng, (15, 60, 120), (70, 130, 200))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    period = rng.uniform(4, 9)
    wobble = 2.0 * np.sin(2 * math.pi * xs / rng.uniform(20, 60) + rng.uniform(0, 2 * math.pi))
    ripples = np.sin(2 * math.pi * (ys + wobble) / period).astype(np.float32)
    return base + ripples[..., None] * np.float32(rng.uniform(18, 30))


def _wall(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Bricks: brownish-grey blocks with per-brick shade and light mortar lines, rows offset by half a brick."""
    base = _colour(rng, (120, 80, 60), (190, 140, 120))
    brick_h = int(rng.integers(8, 15))
    brick_w = 2 * brick_h + int(rng.integers(0, 6))
    ys, xs = np.mgrid[0:height, 0:width]
    row = ys // brick_h
    shifted = xs + (row % 2) * (brick_w // 2)
    col = shifted // brick_w
    shade = rng.uniform(-18, 18, size=(height // brick_h + 1, width // brick_w + 2)).astype(np.float32)
    wall = base + shade[row, col][..., None]
    mortar = (ys % brick_h < 2) | (shifted % brick_w < 2)
    wall[mortar] = np.float32(rng.uniform(190, 225))
    return wall


_TEXTURES = {"sky": _sky, "grass": _grass, "water": _water, "wall": _wall}
