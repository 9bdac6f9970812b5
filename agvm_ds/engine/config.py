"""Experiment configuration: one YAML file, typed sections, command-line overrides.

Every section is a frozen pydantic dataclass (``config_checks.section``) that declares its ranges and
choices on its fields, so a typo is an error at start-up that lists the valid keys, and a bad value
names its dotted key and what is allowed. ``key.sub=value`` overrides are parsed as YAML scalars
(``lr=0.02``, ``agvm.enabled=false``, ``data.scales=[224,256]``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

from pydantic import Field, model_validator

from ..agvm import AGVMConfig
from ..config_checks import (
    Count,
    Expected,
    Items,
    PositiveCount,
    build,
    parse_overrides,
    read_config,
    reject_unknown_keys,
    section,
)
from ..data.transforms import RECIPES
from ..detection.spec import ModelSpec, load_spec
from ..resources import find, shipped_dir, shipped_names

#: DeepSpeed keys the trainer derives from the experiment -> the experiment key to set instead.
TRAINER_OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "data.batch_size_per_rank",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "data.batch_size_per_rank and train.gradient_accumulation_steps (times the ranks)",
}
#: data.dataset -> the tasks it serves and the keys it needs (``synthetic`` generates the set the model's task needs).
DATASETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "synthetic": (("detection", "instance", "semantic", "panoptic"), ()),
    "coco": (("detection", "instance"), ("train_images", "train_ann", "val_images", "val_ann")),
    "coco_panoptic": (("panoptic",), ("train_images", "train_ann", "val_images", "val_ann")),
    "ade20k": (("semantic",), ()),
    "semantic_folder": (("semantic",), ("train_images", "train_masks", "val_images", "val_masks", "classes")),
}
_DATA_PATH_KINDS = {"images": "image folder", "masks": "label folder", "ann": "annotation file",
                    "classes": "class list file", "root": "ADE20K folder"}
#: The semantic-segmentation recipe (mmseg's ADE20K pipeline, ``data.segmentation_transforms``); the
#: detection recipes are ``data.transforms.RECIPES``.
SEMANTIC_RECIPE = "semseg"

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "deepspeed_file",
    "load_config",
    "parse_overrides",
]


@section
class DataConfig:
    """Where the images come from and how batches are made.

    ``dataset: synthetic`` generates the embedded default set of the model's task under ``root`` on
    first use (detection: ``root`` itself; semantic and panoptic segmentation: ``root/semantic``,
    ``root/panoptic``). ``coco`` reads ``train_images``/``train_ann`` and ``val_images``/``val_ann``;
    ``coco_panoptic`` the same four for the panoptic JSON files, their PNG folders in
    ``train_masks``/``val_masks`` (default: the JSON path without ``.json``); ``ade20k`` the
    ADEChallengeData2016 folder ``root``; ``semantic_folder`` images and label PNGs
    (``train_images``/``train_masks``, ``val_images``/``val_masks``) and a class list file ``classes``.

    ``recipe: semseg`` (semantic segmentation): resize to fit ``max_size`` x ``max(scales)`` times a
    ratio drawn from ``resize_ratio``, random crop of ``crop_size`` with at most ``cat_max_ratio`` of
    one class, flip, photometric distortion; evaluation at ``max(scales)`` / ``max_size``.
    """

    dataset: Literal[tuple(DATASETS)] = "synthetic"
    root: str = "data/synthetic"
    train_images: Optional[str] = None
    train_ann: Optional[str] = None
    val_images: Optional[str] = None
    val_ann: Optional[str] = None
    train_masks: Optional[str] = None
    val_masks: Optional[str] = None
    classes: Optional[str] = None
    synthetic_train: PositiveCount = 600
    synthetic_val: PositiveCount = 100
    synthetic_size: PositiveCount = 256
    batch_size_per_rank: PositiveCount = 2
    num_workers: Count = 2
    recipe: Literal[RECIPES + (SEMANTIC_RECIPE,)] = "multiscale"
    scales: Annotated[Items[PositiveCount], Field(min_length=1)] = (640, 672, 704, 736, 768, 800)
    max_size: PositiveCount = 1333
    lsj_size: PositiveCount = 1024
    crop_size: PositiveCount = 512
    resize_ratio: Annotated[Items[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2),
                            Expected("two positive numbers [low, high]")] = (0.5, 2.0)
    cat_max_ratio: Annotated[float, Field(gt=0, le=1)] = 0.75
    aspect_ratio_grouping: bool = True
    with_masks: Optional[bool] = None  # None: whatever the model needs
    test_size: Optional[PositiveCount] = None
    test_max_size: Optional[PositiveCount] = None

    @model_validator(mode="after")
    def _check_paths_and_test_size(self) -> "DataConfig":
        missing = [k for k in DATASETS[self.dataset][1] if not getattr(self, k)]
        if missing:
            raise ValueError(f"data.dataset={self.dataset} needs data.{', data.'.join(missing)}")
        if self.resize_ratio[0] > self.resize_ratio[1]:
            raise ValueError(f"data.resize_ratio={list(self.resize_ratio)!r}: expected [low, high] with low <= high")
        if self.recipe in ("none", "hflip") and (self.test_size is None) != (self.test_max_size is None):
            raise ValueError(
                f"data.test_size={self.test_size!r}, data.test_max_size={self.test_max_size!r}: recipe "
                f"{self.recipe!r} does not resize, so there is nothing to derive the other from; give both or neither"
            )
        resize = self.test_resize()
        if resize is not None and resize[1] < resize[0]:
            raise ValueError(
                f"data.test_max_size={resize[1]} (longer-side cap of evaluation images) is below "
                f"data.test_size={resize[0]} (their shorter side): expected test_max_size >= test_size"
            )
        return self

    def test_resize(self) -> Optional[tuple[int, int]]:
        """(shorter side, longer-side cap) of evaluation images, or None to leave it to the model spec.

        Evaluation must see images at the resolution training saw them, so unless ``test_size`` /
        ``test_max_size`` are given they come from the training recipe: ``multiscale`` evaluates at
        its largest scale (``max(scales)``, ``max_size``), as detectron2's and the torchvision
        references' multi-scale recipes do; ``semseg`` at its base scale (mmseg's test resize);
        ``lsj`` at ``lsj_size``. ``none`` and ``hflip`` do not
        resize: the model spec's ``min_size``/``max_size`` then drive training and evaluation alike.
        A single given value keeps the other from the recipe.
        """
        derived = {"multiscale": (max(self.scales), self.max_size),
                   SEMANTIC_RECIPE: (max(self.scales), self.max_size),
                   "lsj": (self.lsj_size, self.lsj_size)}.get(self.recipe)
        if derived is None and self.test_size is None:
            return None
        size = self.test_size if self.test_size is not None else derived[0]
        cap = self.test_max_size if self.test_max_size is not None else derived[1]
        return size, cap


@section
class OptimizerConfig:
    """The base optimizer AGVM wraps. ``lr`` is for ``base_batch_size`` images and is scaled to the
    global batch by ``lr_scaling`` (linear, as Goyal et al.; sqrt, as for adaptive optimizers; none).

    ``lamb`` and ``lars`` are layer-wise (``agvm_ds.optim.layerwise``): one trust ratio per parameter
    tensor under every ZeRO stage; no-weight-decay groups (norms, biases) are not adapted. ``lamb``
    uses ``betas``, ``eps`` and ``bias_correction``; ``lars`` uses ``momentum``, ``eps`` and
    ``trust_coefficient`` (ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps))."""

    name: Literal["sgd", "adamw", "lamb", "lars"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.02
    base_batch_size: PositiveCount = 16
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    betas: Items[Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    trust_coefficient: Annotated[float, Field(gt=0, le=1)] = 0.001
    bias_correction: bool = True

    @model_validator(mode="after")
    def _check_betas(self) -> "OptimizerConfig":
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas={list(self.betas)!r}: expected exactly 2 numbers in [0, 1)")
        return self


@section
class ScheduleConfig:
    """Warm-up then decay, as multipliers of the peak learning rate.

    ``milestones`` are fractions of the total iterations for ``decay: step`` (the paper's 16-epoch
    COCO recipe steps at 12/16 and 14/16); ``power`` is the exponent of ``decay: poly``.
    """

    warmup: Literal["linear", "exponential", "none"] = "linear"
    warmup_iters: Count = 100
    warmup_ratio: Annotated[float, Field(gt=0, le=1)] = 0.001
    decay: Literal["step", "cosine", "poly", "none"] = "step"
    milestones: Items[Annotated[float, Field(gt=0, lt=1), Expected("fractions of the run in (0, 1)")]] = (0.75, 0.875)
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    power: Annotated[float, Field(gt=0)] = 1.0


@section
class TrainConfig:
    """Length of the run and how often it logs, evaluates and checkpoints (in optimizer steps
    where the name says iters, else in epochs).

    ``max_consecutive_skips``: a run whose loss stays non-finite has diverged; after this many
    consecutive skipped micro-batches it stops with an error instead of skipping forever.
    ``dist_timeout_s``: the process-group timeout, how long a collective waits for a rank that is
    gone or stuck before the job fails.
    """

    epochs: PositiveCount = 12
    max_iters: Optional[PositiveCount] = None
    gradient_accumulation_steps: PositiveCount = 1
    log_interval: PositiveCount = 10
    eval_interval: PositiveCount = 1
    eval_at_start: bool = False
    checkpoint_interval: PositiveCount = 1
    checkpoint_iters: Optional[PositiveCount] = None
    keep_checkpoints: PositiveCount = 2
    skip_nonfinite_loss: bool = True
    max_consecutive_skips: PositiveCount = 20
    dist_timeout_s: Annotated[float, Field(gt=0)] = 300.0


@section
class ExperimentConfig:
    """A whole experiment. ``model`` names a shipped definition (``models/``) or a YAML path, and
    ``model_overrides`` changes any of its fields; ``deepspeed`` names a shipped DeepSpeed config
    (``ds_configs/``) or a JSON path, whose batch sizes the trainer fills in, with
    ``deepspeed_overrides`` merged on top (see ``agvm_ds.resources``)."""

    model: str = "faster_rcnn_r18_tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    agvm: AGVMConfig = field(default_factory=AGVMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: str = "ds_configs/zero2_fp32.json"
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)
    output_dir: Annotated[str, Field(min_length=1), Expected("the directory of the run")] = "runs/default"
    seed: Count = 0

    @model_validator(mode="after")
    def _check_overrides(self) -> "ExperimentConfig":
        for key, instead in TRAINER_OWNED_DEEPSPEED_KEYS.items():
            if key in self.deepspeed_overrides:
                raise ValueError(f"deepspeed_overrides.{key}: the trainer sets it from the experiment; "
                                 f"set {instead} instead")
        reject_unknown_keys(ModelSpec, {k.split(".")[0]: v for k, v in self.model_overrides.items()},
                            "model_overrides", "model_overrides.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads an experiment file (a path, or a shipped name: ``synthetic_tiny``) or the defaults, applies
    ``key.sub=value`` overrides, and checks what the config refers to: the model definition with its
    overrides, the DeepSpeed JSON file, the data set's folders and files, and that the data set serves the model's task.

    Raises:
        ValueError: one line naming the key (and the file) at fault and what is allowed.
    """
    if path is not None:
        found = find("configs", path)
        if found is None:
            raise FileNotFoundError(f"experiment config {str(path)!r}: no such file (a relative path is read from "
                                    f"{Path.cwd()}) and not a shipped name; "
                                    f"shipped: {', '.join(shipped_names('configs'))}")
        path = found
    values = read_config(path, overrides, "experiment config")
    try:
        config = build(ExperimentConfig, values)
        _check_references(config)
    except ValueError as error:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{error}") from None
    return config


def _check_references(config: ExperimentConfig) -> None:
    """The files and definitions a config names exist and fit together (see ``load_config``): the model's
    task is one the data set serves, a semantic model trains with the ``semseg`` recipe (and only it)."""
    try:
        spec = load_spec(config.model, config.model_overrides)
    except FileNotFoundError as error:
        raise ValueError(f"model={config.model!r}: {error}") from None
    _check_deepspeed_file(config.deepspeed)
    data = config.data
    tasks, keys = DATASETS[data.dataset]
    if spec.task not in tasks:
        serving = sorted(name for name, (served, _) in DATASETS.items() if spec.task in served)
        raise ValueError(f"data.dataset={data.dataset}: model {config.model!r} is a {spec.task} model; "
                         f"data sets for {spec.task}: {', '.join(serving)}")
    if (spec.task == "semantic") != (data.recipe == SEMANTIC_RECIPE):
        raise ValueError(f"data.recipe={data.recipe}: {'semantic' if spec.task == 'semantic' else spec.task} models "
                         + ("train with recipe semseg" if spec.task == "semantic"
                            else f"train with one of {', '.join(RECIPES)}"))
    paths = {key: getattr(data, key) for key in keys + ("train_masks", "val_masks") if getattr(data, key)}
    if data.dataset == "ade20k":
        paths = {"root": data.root}
    for key, value in paths.items():
        what = _DATA_PATH_KINDS[key.split("_")[-1]]
        path = Path(value)
        if not (path.is_dir() if what.endswith("folder") else path.is_file()):
            raise ValueError(f"data.{key}={value!r}: {what} not found")


def deepspeed_file(deepspeed: str) -> Path:
    """The DeepSpeed JSON file ``deepspeed`` names: a path, or a shipped name (``zero2_fp32``)."""
    path = find("ds_configs", deepspeed)
    if path is None:
        raise ValueError(
            f"deepspeed={deepspeed!r}: file not found (a relative path is read from {Path.cwd()}) and not a shipped "
            f"name; the shipped configs in {shipped_dir('ds_configs')} are {', '.join(shipped_names('ds_configs'))}"
        )
    return path


def _check_deepspeed_file(deepspeed: str) -> None:
    path = deepspeed_file(deepspeed)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"deepspeed={deepspeed!r}: not a JSON file ({error})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"deepspeed={deepspeed!r}: expected a JSON object at the top level")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

