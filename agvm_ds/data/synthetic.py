"""A deterministic synthetic COCO-format detection/instance-segmentation set, generated on demand.

Why: the training, resume and evaluation paths need real COCO files (JPEGs on disk, an
``instances_*.json`` with polygons, RLEs, crowd regions and empty images) that a test or a CPU smoke
run can create in seconds and that a tiny detector can learn in minutes. Real COCO is 20 GB.

What is in it:

- four shape classes with **non-contiguous** COCO category ids (``circle=1, square=3,
  triangle=5, star=7``) so that every consumer has to map ids to contiguous labels and back;
- shapes of random size (about 12-45 % of ``image_size``, i.e. ~30-115 px at 256), rotation,
  colour and position, never overlapping, 1-6 per image, on textured backgrounds (gradients,
  stripes, blotchy noise) plus pixel noise; colour carries no class information, shape does;
- polygon segmentation for the polygon shapes (square, triangle, star) and compressed RLE for
  circles, so both decoding paths are exercised;
- images of three aspect ratios (``image_size`` is the longer side: 1:1, 4:3 and 3:4), so aspect
  ratio grouping has something to group;
- every 16th image (``index % 16 == 5``) has no annotation at all, and every 16th image
  (``index % 16 == 10``) also holds a crowd region (``iscrowd=1``, uncompressed RLE as in COCO):
  a cluster of small circles or squares annotated as one region.

Determinism: each image draws from its own ``numpy.random.default_rng([seed, split, index])``,
JPEGs are written with fixed settings and the JSON with a fixed key order, so the same parameters
give byte-identical files. A stamp file records the parameters; a second call with the same
parameters returns at once, other parameters regenerate. A file lock makes concurrent calls (for
example one per rank) safe: one generates, the others wait and then find the stamp.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from ..seeding import synthetic_image_rng

__all__ = ["CATEGORIES", "SyntheticPaths", "make_synthetic_coco"]

#: Bump when the drawing code changes, so existing stamped sets are regenerated.
GENERATOR_VERSION = 1

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 5, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "star", "supercategory": "shape"},
)
_SHAPES = tuple(c["name"] for c in CATEGORIES)
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}

_STAMP = "synthetic_coco_stamp.json"
_LOCK = ".synthetic_coco.lock"
_SPLIT_CODE = {"train": 0, "val": 1}
_EMPTY_EVERY, _EMPTY_AT, _CROWD_AT = 16, 5, 10
_JPEG_QUALITY = 92


@dataclass(frozen=True)
class SyntheticPaths:
    """Where :func:`make_synthetic_coco` put the two splits (image folders and COCO json files)."""

    root: Path
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path


def make_synthetic_coco(
    root: str | os.PathLike,
    num_train: int = 1000,
    num_val: int = 200,
    image_size: int = 256,
    seed: int = 0,
) -> SyntheticPaths:
    """Create (or reuse) the synthetic set under ``root`` and return its paths.

    Layout: ``root/images/{train,val}/<image_id:012d>.jpg`` and
    ``root/annotations/instances_{train,val}.json``. ``image_size`` is the longer image side
    (at least 64). Train image ids are ``1..num_train``, val ids ``1..num_val``. ~1000 images take
    a few seconds.

    Regeneration only ever deletes folders that a previous call stamped as its own; if ``root``
    already holds ``images/`` or ``annotations/`` without a stamp, a ``FileExistsError`` is
    raised instead of overwriting someone's data.
    """
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = SyntheticPaths(
        root=root,
        train_images=root / "images" / "train",
        train_ann=root / "annotations" / "instances_train.json",
        val_images=root / "images" / "val",
        val_ann=root / "annotations" / "instances_val.json",
    )
    params = {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
    }
    with _locked(root / _LOCK):
        if _is_complete(root / _STAMP, params, _coco_files(paths, params)):
            return paths
        _claim(root, params, _STAMP, ("images", "annotations"), "make_synthetic_coco")
        for split, count, folder, ann in (
            ("train", num_train, paths.train_images, paths.train_ann),
            ("val", num_val, paths.val_images, paths.val_ann),
        ):
            _write_split(split, count, folder, ann, image_size, seed)
        _write_json(root / _STAMP, {**params, "complete": True})
    return paths


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock, so concurrent generators (one per rank) take turns."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _coco_files(paths: SyntheticPaths, params: dict[str, Any]) -> list[Path]:
    images = [paths.train_images / _file_name(i + 1) for i in range(params["num_train"])]
    images += [paths.val_images / _file_name(i + 1) for i in range(params["num_val"])]
    return [paths.train_ann, paths.val_ann, *images]


def _is_complete(stamp: Path, params: dict[str, Any], files: Iterable[Path]) -> bool:
    """The stamp records ``params`` as complete and every one of ``files`` exists."""
    if not stamp.is_file():
        return False
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if recorded != {**params, "complete": True}:
        return False
    return all(path.is_file() for path in files)


def _claim(root: Path, params: dict[str, Any], stamp: str, subdirs: Iterable[str], owner: str) -> None:
    """Remove a previous (stamped) generation and write an incomplete stamp before drawing."""
    owned = (root / stamp).is_file()
    for sub in subdirs:
        target = root / sub
        if target.exists():
            if not owned and any(target.iterdir()):
                raise FileExistsError(
                    f"{target} exists and was not generated by {owner} "
                    f"(no {stamp} in {root}); refusing to overwrite it"
                )
            shutil.rmtree(target)
    _write_json(root / stamp, {**params, "complete": False})


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


def _file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


def _write_split(split: str, count: int, folder: Path, ann_path: Path, image_size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = synthetic_image_rng(seed, _SPLIT_CODE[split], index)
        image_id = index + 1
        pixels, instances = _draw_image(rng, index, image_size)
        height, width = pixels.shape[:2]
        Image.fromarray(pixels).save(folder / _file_name(image_id), format="JPEG", quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": _file_name(image_id), "height": height, "width": width})
        for inst in instances:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **inst})
    info = {
        "description": f"agvm_ds synthetic shapes ({split})",
        "version": str(GENERATOR_VERSION),
        "seed": seed,
        "image_size": image_size,
    }
    coco = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }
    _write_json(ann_path, coco)


# ----------------------------------------------------------------------------------------------
# Drawing


def _draw_image(rng: np.random.Generator, index: int, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """One image (H x W x 3 uint8) and its COCO annotations (without ``id``/``image_id``)."""
    height, width = _canvas_size(rng, image_size)
    canvas = _background(rng, height, width)
    instances: list[dict] = []
    if index % _EMPTY_EVERY == _EMPTY_AT:
        return _finish(rng, canvas), instances

    taken: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1 of placed shapes
    if index % _EMPTY_EVERY == _CROWD_AT:
        crowd = _crowd_region(rng, height, width, image_size)
        if crowd is not None:
            mask, category, box = crowd
            _paint(rng, canvas, mask)
            taken.append(box)
            instances.append(_rle_annotation(mask, category, iscrowd=1, compressed=False))

    for _ in range(int(rng.integers(1, 7))):
        shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
        placed = _place_shape(rng, shape, height, width, image_size, taken)
        if placed is None:
            continue
        mask, polygon, box = placed
        _paint(rng, canvas, mask)
        taken.append(box)
        if polygon is None:
            instances.append(_rle_annotation(mask, _CATEGORY_ID[shape], iscrowd=0, compressed=True))
        else:
            instances.append(_polygon_annotation(mask, polygon, _CATEGORY_ID[shape]))
    return _finish(rng, canvas), instances


def _canvas_size(rng: np.random.Generator, image_size: int) -> tuple[int, int]:
    """(height, width): square, 4:3 or 3:4, ``image_size`` the longer side."""
    short = int(round(image_size * 0.75 / 8)) * 8
    return [(image_size, image_size), (short, image_size), (image_size, short)][rng.choice(3, p=[0.4, 0.3, 0.3])]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 H x W x 3 texture in [0, 255]: a gradient, stripes or low-frequency blotches."""
    c0 = rng.uniform(50, 205, size=3)
    c1 = np.clip(c0 + rng.uniform(-70, 70, size=3), 0, 255)
    kind = int(rng.integers(3))
    if kind == 2:  # blotches: a coarse random grid upsampled bilinearly
        cells = rng.uniform(0, 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)))).astype(np.float32)
        t = np.asarray(Image.fromarray(cells).resize((width, height), Image.BILINEAR))
    else:
        angle = rng.uniform(0, math.pi)
        xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(angle))
        ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(angle))
        proj = xs + ys
        if kind == 0:  # linear gradient
            t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        else:  # sinusoidal stripes, 8-32 px period
            period = rng.uniform(8, 32)
            t = 0.5 + 0.5 * np.sin(proj * np.float32(2 * math.pi / period) + np.float32(rng.uniform(0, 2 * math.pi)))
    c0, c1 = c0.astype(np.float32), c1.astype(np.float32)
    return c0 + t[..., None] * (c1 - c0)


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    noisy = canvas + rng.integers(-10, 11, size=canvas.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill ``mask`` with a random colour that stands out from the background underneath."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    region, canvas = mask[window].astype(bool), canvas[window]
    under = canvas[region].mean(axis=0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.abs(colour - under).sum() >= 180:
            break
        colour = rng.uniform(0, 255, size=3)
    else:  # fall back to the colour opposite the background
        colour = np.where(under > 127, 20.0, 235.0)
    shade = rng.uniform(0.85, 1.0)
    canvas[region] = np.clip(colour * shade, 0, 255)


def _free(box: tuple[float, float, float, float], taken: list[tuple[float, float, float, float]]) -> bool:
    gap = 4.0
    return all(
        box[2] + gap <= t[0] or t[2] + gap <= box[0] or box[3] + gap <= t[1] or t[3] + gap <= box[1]
        for t in taken
    )


def _place_shape(
    rng: np.random.Generator,
    shape: str,
    height: int,
    width: int,
    image_size: int,
    taken: list[tuple[float, float, float, float]],
) -> tuple[np.ndarray, list[float] | None, tuple[float, float, float, float]] | None:
    """Draw a non-overlapping shape: (mask, polygon or None for a circle, box) or None if no room."""
    size = min(rng.uniform(0.12, 0.45) * image_size, 0.9 * min(height, width))
    radius = size / 2
    if shape == "circle":
        offsets = np.array([[-radius, -radius], [radius, radius]])
    else:
        offsets = _polygon_offsets(rng, shape, radius)
    lo, hi = offsets.min(axis=0), offsets.max(axis=0)
    margin = 2.0
    for _ in range(30):
        cx = rng.uniform(margin - lo[0], width - margin - hi[0])
        cy = rng.uniform(margin - lo[1], height - margin - hi[1])
        box = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
        if _free(box, taken):
            break
    else:
        return None
    if shape == "circle":
        yy, xx = np.mgrid[0:height, 0:width]
        mask = ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2).astype(np.uint8)
        return mask, None, box
    polygon = [round(float(v), 2) for v in (offsets + [cx, cy]).reshape(-1)]
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)))
    return mask, polygon, box


def _polygon_offsets(rng: np.random.Generator, shape: str, radius: float) -> np.ndarray:
    """Vertices (K x 2, relative to the centre) of a randomly rotated square, triangle or star."""
    theta = rng.uniform(0, 2 * math.pi)
    if shape == "square":
        angles, radii = theta + np.arange(4) * math.pi / 2, np.full(4, radius)
    elif shape == "triangle":
        angles, radii = theta + np.arange(3) * 2 * math.pi / 3, np.full(3, radius)
    elif shape == "star":
        angles = theta + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _crowd_region(
    rng: np.random.Generator, height: int, width: int, image_size: int
) -> tuple[np.ndarray, int, tuple[float, float, float, float]] | None:
    """A packed cluster of small circles or squares, annotated as one crowd region."""
    rw = int(rng.uniform(0.25, 0.4) * image_size)
    rh = int(rng.uniform(0.25, 0.4) * image_size)
    rw, rh = min(rw, width - 4), min(rh, height - 4)
    x0 = int(rng.integers(2, width - rw - 1))
    y0 = int(rng.integers(2, height - rh - 1))
    shape = "circle" if rng.random() < 0.5 else "square"
    r = float(rng.uniform(3, 5))
    step = 2.6 * r
    mask = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for cy in np.arange(y0 + r, y0 + rh - r, step):
        for cx in np.arange(x0 + r, x0 + rw - r, step):
            jx, jy = cx + rng.uniform(-0.5, 0.5), cy + rng.uniform(-0.5, 0.5)
            if shape == "circle":
                mask |= ((xx + 0.5 - jx) ** 2 + (yy + 0.5 - jy) ** 2 <= r * r).astype(np.uint8)
            else:
                mask[int(jy - r) : int(jy + r), int(jx - r) : int(jx + r)] = 1
    if not mask.any():
        return None
    return mask, _CATEGORY_ID[shape], (float(x0), float(y0), float(x0 + rw), float(y0 + rh))


def _rle_annotation(mask: np.ndarray, category_id: int, iscrowd: int, compressed: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    bbox = [round(float(v), 2) for v in mask_utils.toBbox(rle)]
    if compressed:
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    else:
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": _uncompressed_counts(mask)}
    return {
        "category_id": category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


def _polygon_annotation(mask: np.ndarray, polygon: list[float], category_id: int) -> dict:
    # The box is the rasterised mask's extent, not the polygon's: the painted pixels are the mask,
    # and thin star tips that rasterise to nothing would otherwise stretch the box past the object.
    bbox = [float(v) for v in mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask)))]
    return {
        "category_id": category_id,
        "segmentation": [polygon],
        "area": float(mask.sum()),
        "bbox": bbox,
        "iscrowd": 0,
    }


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return [int(c) for c in counts]


def main(argv: list[str] | None = None) -> None:
    """``python -m agvm_ds.data ROOT [--num-train N] [--num-val N] [--image-size S] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m agvm_ds.data", description="Generate (or reuse) the synthetic COCO shapes set."
    )
    parser.add_argument("root")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_synthetic_coco(args.root, args.num_train, args.num_val, args.image_size, args.seed)
    for name in ("train_images", "train_ann", "val_images", "val_ann"):
        print(f"{name}: {getattr(paths, name)}")
