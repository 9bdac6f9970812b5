"""A detector definition, validated once and loaded by name from ``models/<name>.yaml``.

Why a flat spec: a user picks a detector by name (as timm picks a model by name) and changes a few
knobs on the command line; a typo or a bad value should fail when the spec is read, naming the key,
not deep inside torchvision at the first iteration.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, Optional, Union

import timm
from pydantic import Field, model_validator
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet

from ..config_checks import Expected, Items, PositiveCount, apply_overrides, build, invalid, read_yaml_mapping, section
from ..resources import find, shipped_dir, shipped_names

__all__ = ["DEFAULT_ANCHOR_SIZES", "DEFAULT_ASPECT_RATIOS", "DETECTORS", "FEATURE_MAPS", "MODELS_DIR", "NORMS",
           "TASKS", "ModelSpec", "backbone_family", "detector_knobs", "load_spec", "model_names"]

MODELS_DIR = shipped_dir("models")
"""The folder of the shipped definitions (``<name>.yaml``): the package's copy, or the checkout's ``models/``."""



class _Models(Mapping[str, type]):
    """Model name -> class; a class given as ``"module:Class"`` is imported when first looked up.

    The segmentation models live in ``agvm_ds.segmentation``, which builds on this package's
    backbone (and so imports this module): importing them here at load time would be a cycle.
    """

    def __init__(self, classes: Mapping[str, Union[type, str]]) -> None:
        self._classes = dict(classes)

    def __getitem__(self, name: str) -> type:
        cls = self._classes[name]
        if isinstance(cls, str):
            module, _, attr = cls.partition(":")
            cls = self._classes[name] = getattr(importlib.import_module(module), attr)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


DETECTORS: Mapping[str, type] = _Models({
    "faster_rcnn": FasterRCNN,
    "mask_rcnn": MaskRCNN,
    "retinanet": RetinaNet,
    "semantic_fpn": "agvm_ds.segmentation.semantic:SemanticFPN",
    "upernet": "agvm_ds.segmentation.semantic:UperNet",
    "panoptic_fpn": "agvm_ds.segmentation.panoptic:PanopticFPN",
})
"""``detector`` name -> model class (torchvision's detectors, ``agvm_ds.segmentation``'s segmenters)."""
NORMS = ("frozen_bn", "bn", "sync_bn")

#: What each model predicts (``ModelSpec.task``).
TASKS = {"faster_rcnn": "detection", "retinanet": "detection", "mask_rcnn": "instance",
         "semantic_fpn": "semantic", "upernet": "semantic", "panoptic_fpn": "panoptic"}

#: Feature maps the FPN backbone hands each detector's heads: C2-C5 + a max-pooled level for the
#: R-CNNs (Panoptic FPN's included), C3-C5 + P6/P7 for RetinaNet (see ``build_backbone``); one
#: anchor level each. Semantic models have no anchors.
FEATURE_MAPS = {"faster_rcnn": 5, "mask_rcnn": 5, "retinanet": 5, "panoptic_fpn": 5}

Anchors = tuple[tuple[float, ...], ...]
Number = Union[int, float]
Side = Annotated[int, Field(ge=32)]
#: ``min_size``: torchvision's resize, one shorter side or a list to pick from per training image.
MinSize = Annotated[Union[Side, Annotated[Items[Side], Field(min_length=1)]],
                    Expected("an integer >= 32 or a non-empty list of them")]
#: ``anchor_sizes``/``aspect_ratios`` as given: numbers, or lists of numbers, per level; the spec holds
#: them as :data:`Anchors`, one tuple per feature map (see ``ModelSpec``).
AnchorLevel = Annotated[Union[Number, Items[Number]], Expected("a number or a list of numbers")]
AnchorsGiven = Annotated[Optional[Items[AnchorLevel]], Expected("a list of numbers or of lists, one per feature map")]
#: torchvision's default anchors (``faster_rcnn._default_anchorgen``, ``retinanet._default_anchorgen``):
#: sizes per level (one for the R-CNNs, three octave scales for RetinaNet) and ratios per level.
DEFAULT_ANCHOR_SIZES: dict[str, Anchors] = {
    "faster_rcnn": tuple((x,) for x in (32, 64, 128, 256, 512)),
    "mask_rcnn": tuple((x,) for x in (32, 64, 128, 256, 512)),
    "panoptic_fpn": tuple((x,) for x in (32, 64, 128, 256, 512)),
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
    """The numeric keyword arguments of the model class, with their defaults.

    These are the knobs ``detector_kwargs`` may set (sampling sizes, NMS thresholds, top-k, head
    widths, loss weights); arguments that take modules or that ``ModelSpec`` sets itself are
    excluded. A class passing ``**kwargs`` on to its base (Panoptic FPN to Mask R-CNN) also has the
    base's knobs.
    """
    knobs: dict[str, Any] = {}
    for cls in DETECTORS[detector].__mro__:
        if cls is nn.Module or "__init__" not in vars(cls):
            continue
        for p in inspect.signature(cls.__init__).parameters.values():
            if (isinstance(p.default, (int, float)) and not isinstance(p.default, bool)
                    and p.name not in ("min_size", "max_size")):
                knobs.setdefault(p.name, p.default)
    return knobs


@section(label="model spec")
class ModelSpec:
    """What ``build_detector`` builds.

    Args:
        detector: ``faster_rcnn``, ``mask_rcnn`` or ``retinanet`` (torchvision's classes);
            ``semantic_fpn`` or ``upernet`` (semantic segmentation), ``panoptic_fpn`` (Mask R-CNN +
            a semantic branch); see :data:`DETECTORS` and :attr:`task`.
        backbone: a timm model name, ``resnet*`` or ``swin*`` / ``swinv2*``.
        num_classes: number of classes including the background, as torchvision expects (COCO: 81
            with contiguous labels 1..80); Panoptic FPN: its thing classes + background. Semantic
            models: the number of classes, no background (ADE20K: 150). A default only: the
            trainer replaces it from the data set.
        num_stuff_classes: Panoptic FPN's stuff classes (COCO: 53), at least 1; 0 for every other
            model. A default only: the trainer sets it from the data set.
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
        detector_kwargs: numeric knobs of the model class (``rpn_batch_size_per_image``,
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``, ``detections_per_img``, ...;
            segmenters: ``decode_channels``, ``aux_weight``, ``semantic_weight``, ``stuff_area``, ...);
            see :func:`detector_knobs`.
        anchor_sizes: anchor sizes in pixels of the resized image, per FPN level (5 levels): a list
            of numbers (one size per level, ``[32, 64, 128, 256, 512]``) or of lists (several per
            level, RetinaNet's octave scales). None: torchvision's default for the detector (see
            :data:`DEFAULT_ANCHOR_SIZES`). Objects far smaller than the smallest anchor get no
            positive anchor: for 8-30 px objects start at 8 or 16.
        aspect_ratios: anchor height / width ratios: one list shared by every level, or one list
            per level. None: torchvision's ``[0.5, 1.0, 2.0]``. Every level must give the same
            number of anchors (sizes x ratios), as one head is shared across levels.
            Semantic models have no anchors: both stay None there.
        name: the definition's name, for logs (set from the file name when loaded).
    """

    detector: Literal[tuple(DETECTORS)]
    backbone: str
    num_classes: Annotated[int, Field(ge=2), Expected(
        "an integer >= 2 (the classes plus the background; semantic models: the classes)")] = 81
    num_stuff_classes: Annotated[int, Field(ge=0), Expected("a non-negative integer")] = 0
    min_size: MinSize = 800
    max_size: int = 1333
    fpn_channels: PositiveCount = 256
    trainable_stages: Annotated[int, Field(ge=1, le=5),
                                Expected("an integer in [1, 5] (AGVM's anchor, the backbone, must train)")] = 3
    norm: Literal[NORMS] = "frozen_bn"
    checkpointing: bool = False
    pretrained: Annotated[Union[bool, str], Expected("true, false, or a timm name of the backbone's weights")] = False
    pretrained_file: Annotated[Optional[Annotated[str, Field(min_length=1)]],
                               Expected("null or the path of a local checkpoint file")] = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    detector_kwargs: dict[str, Any] = field(default_factory=dict)
    anchor_sizes: AnchorsGiven = None
    aspect_ratios: AnchorsGiven = None
    name: str = ""

    @model_validator(mode="after")
    def _check_rules(self) -> "ModelSpec":
        """The rules between fields; sets ``anchor_sizes``/``aspect_ratios`` to one tuple per feature map."""
        family = backbone_family(self.backbone)
        sizes = self.min_size if isinstance(self.min_size, tuple) else (self.min_size,)
        if self.max_size < max(sizes):
            raise invalid(f"expected an integer >= min_size ({max(sizes)})", max_size=self.max_size)
        if family == "swin" and self.norm != "frozen_bn":
            raise invalid("it applies to ResNet bodies only; Swin bodies use LayerNorm", norm=self.norm)
        if isinstance(self.pretrained, str) and not (
                self.pretrained.startswith(f"{self.backbone}.") and timm.is_model(self.pretrained)):
            raise invalid(f"expected true, false, or a timm name of {self.backbone!r} weights ({self.backbone}.<tag>, "
                          f"e.g. from timm.list_pretrained({self.backbone + '*'!r}))", pretrained=self.pretrained)
        if self.pretrained and self.pretrained_file is not None:
            raise invalid("pretrained_file is given too; keep one of them", pretrained=self.pretrained)
        if self.detector == "panoptic_fpn" and self.num_stuff_classes < 1:
            raise invalid("expected an integer >= 1 for panoptic_fpn (its stuff classes)",
                          num_stuff_classes=self.num_stuff_classes)
        if self.detector != "panoptic_fpn" and self.num_stuff_classes != 0:
            raise invalid(f"expected 0: only panoptic_fpn has stuff classes, not {self.detector}",
                          num_stuff_classes=self.num_stuff_classes)
        self._check_detector_kwargs()
        self._resolve_anchors()
        return self

    @property
    def task(self) -> str:
        """``"detection"`` (Faster R-CNN, RetinaNet), ``"instance"`` (Mask R-CNN), ``"semantic"``
        (Semantic FPN, UperNet) or ``"panoptic"`` (Panoptic FPN): what the model predicts, so the
        trainer picks the data, targets and evaluation."""
        return TASKS[self.detector]

    def _check_detector_kwargs(self) -> None:
        knobs = detector_knobs(self.detector)
        for key, value in self.detector_kwargs.items():
            if key not in knobs:
                raise ValueError(f"detector_kwargs.{key} is not a knob of {DETECTORS[self.detector].__name__}; "
                                 f"valid keys are {sorted(knobs)}")
            expected = int if isinstance(knobs[key], int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, expected) or not math.isfinite(value) or value < 0:
                kind = "non-negative integer" if expected is int else "non-negative number"
                raise invalid(f"expected a {kind}", **{f"detector_kwargs.{key}": value})

    def _resolve_anchors(self) -> None:
        if self.detector not in FEATURE_MAPS:
            given = {k: v for k, v in (("anchor_sizes", self.anchor_sizes), ("aspect_ratios", self.aspect_ratios))
                     if v is not None}
            if given:
                raise invalid(f"{self.detector} has no anchors; leave it null", **given)
            return
        levels = FEATURE_MAPS[self.detector]
        defaults = {"anchor_sizes": DEFAULT_ANCHOR_SIZES[self.detector], "aspect_ratios": DEFAULT_ASPECT_RATIOS}
        for key, default in defaults.items():
            value = getattr(self, key)
            if value is None:
                value = default
            if not value:
                raise invalid(f"expected a list of numbers or of lists, one per feature map ({levels})", **{key: value})
            per_level = [v if isinstance(v, tuple) else (v,) for v in value]
            if key == "aspect_ratios" and not any(isinstance(v, tuple) for v in value):
                per_level = [tuple(value)] * levels  # one list shared by every level
            if len(per_level) != levels:
                raise invalid(f"{len(per_level)} level(s) given, but {self.detector} has {levels} feature maps",
                              **{key: value})
            if not all(level and all(x > 0 for x in level) for level in per_level):
                raise invalid("expected positive numbers, at least one per level", **{key: value})
            object.__setattr__(self, key, tuple(per_level))
        counts = {len(s) * len(r) for s, r in zip(self.anchor_sizes, self.aspect_ratios)}
        if len(counts) > 1:
            raise invalid(f"levels give {sorted(counts)} anchors (sizes x aspect_ratios); one head is shared "
                          "across levels, so every level needs the same number", anchor_sizes=self.anchor_sizes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelSpec":
        """Builds a spec from a mapping (a YAML file); an unknown key lists the valid ones."""
        name = values.get("name") if isinstance(values, Mapping) else None
        return build(cls, values, f"model spec {name}" if name else "model spec")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        if isinstance(self.min_size, tuple):
            values["min_size"] = list(self.min_size)
        for key in ("anchor_sizes", "aspect_ratios"):
            if values[key] is not None:
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

