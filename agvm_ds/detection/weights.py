"""A trained detector in one safetensors file: fp32 (or bf16) weights, its model spec and its classes.

Why the spec and the classes inside the file: it is all a user needs to run the detector (no
DeepSpeed, no run directory, no pickle), and ``load_detector`` cannot pair weights with another
architecture, evaluation size or class list than the ones they were trained with.

Metadata (JSON strings): ``format`` (:data:`FORMAT`), ``spec`` (``ModelSpec.to_dict()``, with
``num_classes`` = classes + background (a semantic model: the classes) and the evaluation
``min_size``/``max_size``), ``categories`` (COCO categories ``[{"id": 3, "name": "square"}, ...]`` in
label order: label k is ``categories[k - 1]``; a semantic model's classes with ``id`` = label; a
panoptic model's categories with ``isthing``, thing label k being the k-th thing, stuff label k the
k-th stuff category), ``dtype`` of the stored floats, plus whatever the writer adds (``checkpoint``,
``iteration``). bf16 halves the file (2 GB instead of 4 for the 1B SwinV2 detector); the model is
rebuilt in fp32 and the weights are widened on load.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CorruptFile
from .detectors import build_detector
from .spec import ModelSpec

__all__ = ["EXPORT_DTYPES", "FORMAT", "detector_from_state_dict", "load_detector", "save_detector"]

FORMAT = "agvm-ds detector"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PathLike = Union[str, os.PathLike]


def save_detector(path: PathLike, state_dict: Mapping[str, torch.Tensor], spec: ModelSpec,
                  categories: Sequence[Mapping[str, Any]], dtype: str = "fp32", **metadata: Any) -> None:
    """Writes ``state_dict`` (floats as ``dtype``: fp32 or bf16) with the spec, the categories and ``metadata``."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    tensors = {name: (t.to(EXPORT_DTYPES[dtype]) if t.is_floating_point() else t).contiguous()
               for name, t in state_dict.items()}
    header = {"format": FORMAT, "spec": spec.to_dict(), "categories": [dict(c) for c in categories],
              "dtype": dtype, **metadata}
    save_file(tensors, str(path), metadata={key: json.dumps(value) for key, value in header.items()})


def load_detector(path: PathLike, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The torchvision detector in an exported file, in eval mode, e.g. ``agvm_ds.load_detector("model.safetensors")``.

    It takes a list of 3 x H x W float images in [0, 1] and returns torchvision's detections
    (``boxes`` XYXY in input pixels, ``labels``, ``scores``, ``masks`` for Mask R-CNN); it resizes
    images to the size evaluation used in training. ``model.categories[label - 1]`` is a label's
    COCO category (``id``, ``name``). Needs torch, torchvision, timm and safetensors, not DeepSpeed.
    """
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
            if header.get("format") != FORMAT:
                raise CorruptFile(f"{path}: not an agvm-ds detector file (its metadata has no format={FORMAT!r}; "
                                  "write one with agvm-export)")
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected a .safetensors file written by agvm-export)") from None
    except (SafetensorError, json.JSONDecodeError) as error:
        raise CorruptFile(f"{path}: not a readable safetensors file ({error}; {_size(path)}): expected a detector "
                          "written by agvm-export; the file may be truncated, export it again") from None
    missing = [key for key in ("spec", "categories") if key not in header]
    if missing:
        raise CorruptFile(f"{path}: its metadata lacks {', '.join(missing)} (expected an agvm-export file)")
    model = detector_from_state_dict(state_dict, ModelSpec.from_dict(header["spec"]), header["categories"])
    return model.to(device)


def detector_from_state_dict(state_dict: Mapping[str, torch.Tensor], spec: ModelSpec,
                             categories: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Builds ``spec`` (no pretrained file is read), loads ``state_dict`` strictly, and sets ``categories``."""
    _check_categories(spec, categories)
    model = build_detector(spec, load_pretrained=False)
    model.load_state_dict(dict(state_dict), strict=True)
    model.categories = [dict(c) for c in categories]
    return model.eval()


def _check_categories(spec: ModelSpec, categories: Sequence[Mapping[str, Any]]) -> None:
    """The class counts of ``spec`` match ``categories``: classes + background for a detector's
    classifier, the classes themselves for a semantic model, thing and stuff categories (``isthing``)
    for a panoptic one."""
    if spec.task == "semantic":
        if spec.num_classes != len(categories):
            raise ValueError(f"model spec has num_classes={spec.num_classes}, but {len(categories)} classes were given")
        return
    things = [c for c in categories if c.get("isthing", 1)] if spec.task == "panoptic" else list(categories)
    if spec.num_classes != len(things) + 1:
        kind = "thing categories" if spec.task == "panoptic" else "categories"
        raise ValueError(f"model spec has num_classes={spec.num_classes}, but {len(things)} {kind} "
                         "(+1 background) were given")
    stuff = len(categories) - len(things)
    if spec.task == "panoptic" and spec.num_stuff_classes != stuff:
        raise ValueError(f"model spec has num_stuff_classes={spec.num_stuff_classes}, but {stuff} stuff categories "
                         "were given")


def _size(path: PathLike) -> str:
    return f"{os.path.getsize(path)} bytes"
