"""A detector definition, validated once and loaded by name from ``models/<name>.yaml``.

Why a flat spec: a user picks a detector by name (as timm picks a model by name) and changes a few
knobs on the command line; a typo or a bad value should fail when the spec is read, naming the key,
not deep inside torchvision at the first iteration.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import timm
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

from ..config_checks import apply_overrides, read_yaml_mapping, reject_unknown_keys
from ..resources import find, shipped_dir, shipped_names

__all__ = ["DEFAULT_ANCHOR_SIZES", "DEFAULT_ASPECT_RATIOS", "DETECTORS", "FEATURE_MAPS", "MODELS_DIR", "NORMS", "ModelSpec", "backbone_family", "detector_knobs", "load_spec", "model_names"]

MODELS_DIR = shipped_dir("models")
"""The folder of the shipped definitions (``<name>.yaml``): the package's copy, or the checkout's ``models/``."""

DETECTORS = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN, "retinanet": RetinaNet}
NORMS = ("frozen_bn", "bn", "sync_bn")

#: Feature maps the FPN backbone hands each detector's heads: C2-C5 + a max-pooled level for the
#: R-CNNs, C3-C5 + P6/P7 for RetinaNet (see ``build_backbone``); one anchor level each.
FEATURE_MAPS = {"faster_rcnn": 5, "mask_rcnn": 5, "retinanet": 5}

Anchors = tuple[tuple[float, ...], ...]
#: torchvision's default anchors (``faster_rcnn._default_anchorgen``, ``retinanet._default_anchorgen``):
#: sizes per level (one for the R-CNNs, three octave scales for RetinaNet) and ratios per level.
DEFAULT_ANCHOR_SIZES: dict[str, Anchors] = {
    "faster_rcnn": tuple((x,) for x in (32, 64, 128, 256, 512)),
    "mask_rcnn": tuple((x,) for x in (32, 64, 128, 256, 512)),
    "retinanet": tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512)),
}
DEFAULT_ASPECT_RATIOS: Anchors = ((0.5, 1.0, 2.0),) * 5


def backbone_family(name: str) -> str:
    """``"resnet"`` or ``"swin"`` for a timm model name the detection adapter supports.

    Raises:
        ValueError: for a name timm does not know, or a family without ``forward_intermediates``
            support here (``swinv2_cr_*`` is a different implementation, NHWC-only).
    """
    if not timm.is_model(name):
        raise ValueError(f"backbone={name!r} is not a timm model name")
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("swin") and not name.startswith("swinv2_cr"):
        return "swin"
    raise ValueError(f"backbone={name!r} is not supported: expected a timm resnet* or swin*/swinv2* model")


def detector_knobs(detector: str) -> dict[str, Any]:
    """The numeric keyword arguments of the torchvision detector class, with their defaults.

    These are the knobs ``detector_kwargs`` may set (sampling sizes, NMS thresholds, top-k);
    arguments that take modules or that ``ModelSpec`` sets itself are excluded.
    """
    params = inspect.signature(DETECTORS[detector].__init__).parameters.values()
    return {
        p.name: p.default
        for p in params
        if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
        and p.name not in ("min_size", "max_size")
    }


@dataclass(frozen=True)
class ModelSpec:
    """What ``build_detector`` builds.

    Args:
        detector: ``faster_rcnn``, ``mask_rcnn`` or ``retinanet`` (torchvision's classes).
        backbone: a timm model name, ``resnet*`` or ``swin*`` / ``swinv2*``.
        num_classes: number of classes including the background, as torchvision expects (COCO: 81
            with contiguous labels 1..80). A default only: the trainer replaces it with the data
            set's category count + 1, from the annotation file.
        min_size / max_size: resize of torchvision's ``GeneralizedRCNNTransform``; ``min_size`` may
            be a list, one picked at random per training image.
        fpn_channels: width of the FPN and of the heads built on it.
        trainable_stages: as torchvision's ``trainable_backbone_layers``: the last N of the 4
            backbone stages are trained, 5 also trains the stem / patch embedding. At least 1: the
            backbone is AGVM's anchor module and needs trainable parameters.
        norm: normalisation of a ResNet body: ``frozen_bn`` (torchvision's detection default, for
            pretrained bodies), ``bn``, or ``sync_bn`` (synchronised across the process group; CUDA
            only). Swin bodies use LayerNorm and accept only the default.
        checkpointing: activation checkpointing of every backbone block (timm
            ``set_grad_checkpointing``, non-reentrant torch checkpointing).
        pretrained: ``true`` loads timm's default pretrained weights of ``backbone``, a timm name
            with a tag (``resnet50.a1_in1k``) those weights; fetched through timm's hub cache (a
            download when not cached). Offline and not cached: an error naming the weights and
            ``pretrained_file``.
        pretrained_file: a local timm checkpoint of the backbone (``.pth``/``.bin``/``.safetensors``),
            loaded through timm's pretrained path (key remapping, window resizing); never downloaded.
            Takes the place of ``pretrained``.
        backbone_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, or the
            architecture of a body timm has no name for: ``embed_dim``, ``depths``, ``num_heads``).
        detector_kwargs: numeric knobs of the torchvision detector class (``rpn_batch_size_per_image``,
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``, ``detections_per_img``, ...).
        anchor_sizes: anchor sizes in pixels of the resized image, per FPN level (5 levels): a list
            of numbers (one size per level, ``[32, 64, 128, 256, 512]``) or of lists (several per
            level, RetinaNet's octave scales). None: torchvision's default for the detector (see
            :data:`DEFAULT_ANCHOR_SIZES`). Objects far smaller than the smallest anchor get no
            positive anchor: for 8-30 px objects start at 8 or 16.
        aspect_ratios: anchor height / width ratios: one list shared by every level, or one list
            per level. None: torchvision's ``[0.5, 1.0, 2.0]``. Every level must give the same
            number of anchors (sizes x ratios), as one head is shared across levels.
        name: the definition's name, for logs (set from the file name when loaded).
    """

    detector: str
    backbone: str
    num_classes: int = 81
    min_size: Union[int, tuple[int, ...]] = 800
    max_size: int = 1333
    fpn_channels: int = 256
    trainable_stages: int = 3
    norm: str = "frozen_bn"
    checkpointing: bool = False
    pretrained: Union[bool, str] = False
    pretrained_file: Optional[str] = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)
    anchor_sizes: Optional[Anchors] = None
    aspect_ratios: Optional[Anchors] = None
    name: str = ""

    def __post_init__(self) -> None:
        where = f"model spec {self.name}" if self.name else "model spec"

        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{where}: {key}={getattr(self, key)!r} is invalid: {why}")

        if self.detector not in DETECTORS:
            raise bad("detector", f"expected one of {sorted(DETECTORS)}")
        if not isinstance(self.backbone, str):
            raise bad("backbone", "expected a timm model name")
        family = backbone_family(self.backbone)
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise bad("num_classes", "expected an integer >= 2 (the classes plus the background)")
        if isinstance(self.min_size, list):
            object.__setattr__(self, "min_size", tuple(self.min_size))
        sizes = self.min_size if isinstance(self.min_size, tuple) else (self.min_size,)
        if not sizes or not all(_is_int(s) and s >= 32 for s in sizes):
            raise bad("min_size", "expected an integer >= 32 or a non-empty list of them")
        if not _is_int(self.max_size) or self.max_size < max(sizes):
            raise bad("max_size", f"expected an integer >= min_size ({max(sizes)})")
        if not _is_int(self.fpn_channels) or self.fpn_channels < 1:
            raise bad("fpn_channels", "expected an integer >= 1")
        if not _is_int(self.trainable_stages) or not 1 <= self.trainable_stages <= 5:
            raise bad("trainable_stages", "expected an integer in [1, 5] (AGVM's anchor, the backbone, must train)")
        if self.norm not in NORMS:
            raise bad("norm", f"expected one of {list(NORMS)}")
        if family == "swin" and self.norm != "frozen_bn":
            raise bad("norm", "it applies to ResNet bodies only; Swin bodies use LayerNorm")
        if not isinstance(self.checkpointing, bool):
            raise bad("checkpointing", "expected true or false")
        if self.pretrained_file is not None and (not isinstance(self.pretrained_file, str) or not self.pretrained_file):
            raise bad("pretrained_file", "expected null or the path of a local checkpoint file")
        if not (isinstance(self.pretrained, bool) or (isinstance(self.pretrained, str) and self.pretrained.startswith(
                f"{self.backbone}.") and timm.is_model(self.pretrained))):
            raise bad("pretrained", f"expected true, false, or a timm name of {self.backbone!r} weights "
                                    f"({self.backbone}.<tag>, e.g. from timm.list_pretrained({self.backbone + '*'!r}))")
        if self.pretrained and self.pretrained_file is not None:
            raise bad("pretrained", "pretrained_file is given too; keep one of them")
        if not isinstance(self.backbone_kwargs, dict) or not all(isinstance(k, str) for k in self.backbone_kwargs):
            raise bad("backbone_kwargs", "expected a mapping of timm.create_model argument names to values")
        if not isinstance(self.detector_kwargs, dict):
            raise bad("detector_kwargs", "expected a mapping")
        self._resolve_anchors(bad)
        knobs = detector_knobs(self.detector)
        for key, value in self.detector_kwargs.items():
            if key not in knobs:
                raise ValueError(
                    f"{where}: detector_kwargs.{key} is not a knob of "
                    f"{DETECTORS[self.detector].__name__}; valid keys are {sorted(knobs)}"
                )
            expected = int if isinstance(knobs[key], int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, expected) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{where}: detector_kwargs.{key}={value!r} is invalid: expected a "
                    f"{'non-negative integer' if expected is int else 'non-negative number'}"
                )

    def _resolve_anchors(self, bad: Callable[[str, str], ValueError]) -> None:
        """Sets ``anchor_sizes``/``aspect_ratios`` to one tuple of numbers per feature map, or refuses them."""
        levels = FEATURE_MAPS[self.detector]
        defaults = {"anchor_sizes": DEFAULT_ANCHOR_SIZES[self.detector], "aspect_ratios": DEFAULT_ASPECT_RATIOS}
        for key, default in defaults.items():
            value = getattr(self, key)
            if value is None:
                value = default
            if not isinstance(value, (list, tuple)) or not value:
                raise bad(key, f"expected a list of numbers or of lists, one per feature map ({levels})")
            per_level = [tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in value]
            if key == "aspect_ratios" and not any(isinstance(v, (list, tuple)) for v in value):
                per_level = [tuple(value)] * levels  # one list shared by every level
            if len(per_level) != levels:
                raise bad(key, f"{len(per_level)} level(s) given, but {self.detector} has {levels} feature maps")
            if not all(level and all(_is_real(x) and math.isfinite(x) and x > 0 for x in level) for level in per_level):
                raise bad(key, "expected positive numbers, at least one per level")
            object.__setattr__(self, key, tuple(per_level))
        counts = {len(s) * len(r) for s, r in zip(self.anchor_sizes, self.aspect_ratios)}
        if len(counts) > 1:
            raise bad("anchor_sizes", f"levels give {sorted(counts)} anchors (sizes x aspect_ratios); "
                                      "one head is shared across levels, so every level needs the same number")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelSpec":
        """Builds a spec from a mapping (a YAML file); an unknown key lists the valid ones."""
        reject_unknown_keys(cls, values, "model spec")
        missing = [k for k in ("detector", "backbone") if k not in values]
        if missing:
            raise ValueError(f"model spec: missing key(s) {missing}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if isinstance(self.min_size, tuple):
            values["min_size"] = list(self.min_size)
        for key in ("anchor_sizes", "aspect_ratios"):
            values[key] = [list(level) for level in values[key]]
        return values

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ModelSpec":
        """A copy with ``overrides`` applied (see ``load_spec``)."""
        return ModelSpec.from_dict(apply_overrides(self.to_dict(), overrides))


def model_names() -> list[str]:
    """The names of the shipped definitions."""
    return shipped_names("models")


def load_spec(name_or_path: Union[str, os.PathLike], overrides: Optional[Mapping[str, Any]] = None) -> ModelSpec:
    """Loads the shipped definition ``name`` (``models/<name>.yaml``) or a YAML file given by path, and
    applies ``overrides``.

    Args:
        overrides: key -> value, applied by ``config_checks.apply_overrides``: a dotted key sets a
            nested value (``{"detector_kwargs.rpn_batch_size_per_image": 64}``), a mapping value is
            merged into the mapping it replaces (``{"backbone_kwargs": {"drop_path_rate": 0.1}}``).
    """
    path = find("models", name_or_path)
    if path is None:
        raise ValueError(f"unknown model {str(name_or_path)!r}: not a shipped name nor a YAML file "
                         f"(a relative path is read from {Path.cwd()}); known models are {model_names()}")
    values = read_yaml_mapping(path, "model spec")
    values.setdefault("name", path.stem)
    return ModelSpec.from_dict(apply_overrides(values, overrides or {}))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
