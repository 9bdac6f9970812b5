"""``agvm-predict``: run a trained model on image files; its predictions as JSON and PNG per image.

    agvm-predict RUN_DIR|MODEL.safetensors IMAGE_OR_DIR... --out DIR [--score-threshold 0.5] [--checkpoint TAG]

For each image ``NAME.EXT``: ``DIR/NAME.json``, its detections above the threshold in COCO results
format (``image_id``: the file name's number for COCO-style names, else the name; ``category_id``,
``category_name``, ``bbox`` as ``[x, y, w, h]`` in the image's pixels, ``score``, and
``segmentation`` as compressed RLE for Mask R-CNN), and ``DIR/NAME.png``, the image with the boxes,
labels, scores and masks drawn. A semantic model writes ``DIR/NAME.png``, the label map in colour (one
colour per class, the same in every image), and ``DIR/NAME.json``, the classes found with their pixel
counts. A panoptic model writes ``DIR/NAME.png``, one colour per segment (black: void), and
``DIR/NAME.json``, its ``segments_info`` in COCO panoptic terms (``id`` = the segment's colour index,
``category_id``, ``category_name``, ``isthing``, ``area``, ``score`` for things). Images are decoded
as training decodes them (16-bit, palette, CMYK ...); one that cannot be read is reported by path and
skipped, the others are still processed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torchvision.io import write_png
from torchvision.transforms.v2.functional import to_dtype
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data.coco import ImageReadError, read_rgb
from ..detection.weights import load_detector
from ..engine.trained_run import TrainedRun, command_parser, trained_detector
from ..errors import add_exit_codes, run_command

__all__ = ["IMAGE_SUFFIXES", "image_files", "load_model", "main", "predict_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 0.5  # torchvision's (and the evaluator's) foreground probability


def load_model(source: Union[str, Path], tag: Optional[str] = None) -> torch.nn.Module:
    """An exported ``.safetensors`` file, or a run directory's checkpoint ``tag`` (newest complete by default)."""
    source = Path(source)
    if source.is_file():
        return load_detector(source)
    return trained_detector(TrainedRun.open(source, tag))


def image_files(paths: Iterable[Union[str, Path]]) -> list[Path]:
    """The files given, and the image files (by suffix) of the folders given, in sorted order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


@torch.no_grad()
def predict_image(model: torch.nn.Module, path: Path, score_threshold: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """The decoded uint8 image and the model's output for it; a detector's detections with
    ``score >= score_threshold`` (a segmenter's output is returned whole)."""
    image = read_rgb(path)
    output = model([to_dtype(image, torch.float32, scale=True)])[0]
    if "scores" not in output or "panoptic_seg" in output:
        return image, output
    keep = output["scores"] >= score_threshold
    return image, {k: v[keep] for k, v in output.items()}


def palette(count: int) -> torch.Tensor:
    """``count`` distinct-enough RGB colours (uint8, count x 3), the same for every image and run."""
    return torch.tensor(np.random.default_rng(0).integers(32, 256, (count, 3)), dtype=torch.uint8)


def semantic_results(output: dict[str, Any], categories: Sequence[dict[str, Any]]) -> tuple[dict, torch.Tensor]:
    """A semantic model's output as a summary (each present class's name and pixel count) and a colour image."""
    labels = output["sem_seg"]
    counts = torch.bincount(labels.flatten(), minlength=len(categories))
    summary = {"classes": [{"label": k, "name": categories[k]["name"], "pixels": int(counts[k])}
                           for k in counts.nonzero().flatten().tolist()]}
    return summary, palette(len(categories))[labels].permute(2, 0, 1)


def panoptic_results(output: dict[str, Any], categories: Sequence[dict[str, Any]]) -> tuple[dict, torch.Tensor]:
    """A panoptic model's output as COCO panoptic segments (``id``, ``category_id``, ``category_name``,
    ``isthing``, ``area``, ``score`` for things) and a colour image, one colour per segment."""
    things = [c for c in categories if c["isthing"]]
    stuff = [c for c in categories if not c["isthing"]]
    ids = output["panoptic_seg"]
    segments = []
    for info in output["segments_info"]:
        category = (things if info["isthing"] else stuff)[int(info["label"]) - 1]
        segment = {"id": int(info["id"]), "category_id": category["id"], "category_name": category["name"],
                   "isthing": bool(info["isthing"]), "area": int((ids == info["id"]).sum())}
        if "score" in info:
            segment["score"] = float(info["score"])
        segments.append(segment)
    colours = palette(int(ids.max()) + 1)
    colours[0] = 0  # void
    return {"segments_info": segments}, colours[ids].permute(2, 0, 1)


def coco_results(detections: dict[str, torch.Tensor], categories: Sequence[dict[str, Any]],
                 image_id: Any) -> list[dict[str, Any]]:
    """One image's detections as COCO results, with each category's name."""
    boxes = detections["boxes"].to(torch.float64)
    boxes[:, 2:] -= boxes[:, :2]
    results = []
    for box, label, score in zip(boxes.tolist(), detections["labels"].tolist(), detections["scores"].tolist()):
        category = categories[label - 1]
        results.append({"image_id": image_id, "category_id": category["id"], "category_name": category["name"],
                        "bbox": box, "score": score})
    if "masks" in detections:
        binary = (detections["masks"][:, 0] > MASK_THRESHOLD).permute(1, 2, 0).numpy().astype(np.uint8)
        for result, rle in zip(results, mask_utils.encode(np.asfortranarray(binary))):
            result["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return results


def drawn(image: torch.Tensor, detections: dict[str, torch.Tensor],
          categories: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``image`` with masks, boxes and ``name score`` labels drawn, one colour per class."""
    colours = palette(len(categories) + 1).tolist()
    colors = [tuple(colours[label]) for label in detections["labels"].tolist()]
    if "masks" in detections and colors:
        image = draw_segmentation_masks(image, detections["masks"][:, 0] > MASK_THRESHOLD, alpha=0.4, colors=colors)
    labels = [f"{categories[label - 1]['name']} {score:.2f}"
              for label, score in zip(detections["labels"].tolist(), detections["scores"].tolist())]
    if not labels:
        return image
    return draw_bounding_boxes(image, detections["boxes"], labels=labels, colors=colors, width=2)


def _results(image: torch.Tensor, output: dict[str, Any], categories: Sequence[dict[str, Any]],
             image_id: Union[int, str]) -> tuple[Any, torch.Tensor, str]:
    """What agvm-predict writes for one image: its JSON, its PNG and a few words for the console."""
    if "panoptic_seg" in output:
        results, picture = panoptic_results(output, categories)
        return {"image_id": image_id, **results}, picture, f"{len(results['segments_info'])} segment(s)"
    if "sem_seg" in output:
        results, picture = semantic_results(output, categories)
        return {"image_id": image_id, **results}, picture, f"{len(results['classes'])} class(es)"
    results = coco_results(output, categories, image_id)
    return results, drawn(image, output, categories), f"{len(results)} detection(s)"


def _image_id(path: Path) -> Union[int, str]:
    """COCO file names are the image id (``000000397133.jpg`` -> 397133); other names stay names."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_exit_codes(command_parser("agvm-predict", __doc__, "model",
                                           "a run directory or an agvm-export .safetensors file"))
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="folder for NAME.json and NAME.png per image")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="keep detections scoring at least this (0.5)")
    args = parser.parse_args(argv)
    return run_command("agvm-predict", lambda: _predict(args))


def _predict(args) -> int:
    model = load_model(args.model, args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, failed = image_files(args.images), []
    for path in files:
        try:
            image, detections = predict_image(model, path, args.score_threshold)
        except (ImageReadError, FileNotFoundError) as error:
            print(f"agvm-predict: skipped {path}: {error}", file=sys.stderr)
            failed.append(path)
            continue
        results, picture, what = _results(image, detections, model.categories, _image_id(path))
        (out / f"{path.stem}.json").write_text(json.dumps(results, indent=1))
        write_png(picture, str(out / f"{path.stem}.png"))
        print(f"{path}: {what}")
    print(f"{len(files) - len(failed)} of {len(files)} image(s) written to {out}"
          + (f"; {len(failed)} could not be read" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
