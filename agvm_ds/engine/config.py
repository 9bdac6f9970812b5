"""Experiment configuration: one YAML file, typed sections, command-line overrides.

Every section is a frozen dataclass, so a typo is an error at start-up that lists the valid keys,
and a value of the wrong type names its dotted key. ``key.sub=value`` overrides are parsed as YAML
scalars (``lr=0.02``, ``agvm.enabled=false``, ``data.scales=[224,256]``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..agvm import AGVMConfig
from ..config_checks import apply_overrides, parse_overrides, read_yaml_mapping, reject_unknown_keys
from ..data.transforms import RECIPES
from ..detection.spec import ModelSpec, load_spec
from ..resources import find, shipped_dir, shipped_names


#: DeepSpeed keys the trainer derives from the experiment -> the experiment key to set instead.
TRAINER_OWNED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "data.batch_size_per_rank",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "data.batch_size_per_rank and train.gradient_accumulation_steps (times the ranks)",
}
_COCO_PATH_KEYS = ("train_images", "train_ann", "val_images", "val_ann")

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


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how batches are made.

    ``dataset: synthetic`` generates the embedded default set under ``root`` on first use;
    ``dataset: coco`` reads ``train_images``/``train_ann`` and ``val_images``/``val_ann``.
    """

    dataset: str = "synthetic"
    root: str = "data/synthetic"
    train_images: Optional[str] = None
    train_ann: Optional[str] = None
    val_images: Optional[str] = None
    val_ann: Optional[str] = None
    synthetic_train: int = 600
    synthetic_val: int = 100
    synthetic_size: int = 256
    batch_size_per_rank: int = 2
    num_workers: int = 2
    recipe: str = "multiscale"
    scales: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    lsj_size: int = 1024
    aspect_ratio_grouping: bool = True
    with_masks: Optional[bool] = None  # None: whatever the model needs
    test_size: Optional[int] = None
    test_max_size: Optional[int] = None

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, ("synthetic", "coco"))
        if self.dataset == "coco":
            missing = [k for k in _COCO_PATH_KEYS if not getattr(self, k)]
            if missing:
                raise ValueError(f"data.dataset=coco needs data.{', data.'.join(missing)}")
        for key in ("synthetic_train", "synthetic_val", "synthetic_size", "batch_size_per_rank", "max_size", "lsj_size"):
            _check_int(f"data.{key}", getattr(self, key), 1)
        _check_int("data.num_workers", self.num_workers, 0)
        _check_choice("data.recipe", self.recipe, RECIPES)
        if not self.scales:
            raise ValueError("data.scales=(): expected a non-empty list of shorter-side sizes")
        for scale in self.scales:
            _check_int("data.scales", scale, 1)
        for key in ("test_size", "test_max_size"):
            if getattr(self, key) is not None:
                _check_int(f"data.{key}", getattr(self, key), 1)
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

    def test_resize(self) -> Optional[tuple[int, int]]:
        """(shorter side, longer-side cap) of evaluation images, or None to leave it to the model spec.

        Evaluation must see images at the resolution training saw them, so unless ``test_size`` /
        ``test_max_size`` are given they come from the training recipe: ``multiscale`` evaluates at
        its largest scale (``max(scales)``, ``max_size``), as detectron2's and the torchvision
        references' multi-scale recipes do; ``lsj`` at ``lsj_size``. ``none`` and ``hflip`` do not
        resize: the model spec's ``min_size``/``max_size`` then drive training and evaluation alike.
        A single given value keeps the other from the recipe.
        """
        derived = {"multiscale": (max(self.scales), self.max_size), "lsj": (self.lsj_size, self.lsj_size)}.get(self.recipe)
        if derived is None and self.test_size is None:
            return None
        size = self.test_size if self.test_size is not None else derived[0]
        cap = self.test_max_size if self.test_max_size is not None else derived[1]
        return size, cap


@dataclass(frozen=True)
class OptimizerConfig:
    """The base optimizer AGVM wraps. ``lr`` is for ``base_batch_size`` images and is scaled to the
    global batch by ``lr_scaling`` (linear, as Goyal et al.; sqrt, as for adaptive optimizers; none)."""

    name: str = "sgd"
    lr: float = 0.02
    base_batch_size: int = 16
    lr_scaling: str = "linear"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_choice("optimizer.name", self.name, ("sgd", "adamw", "lamb"))
        _check_choice("optimizer.lr_scaling", self.lr_scaling, ("linear", "sqrt", "none"))
        _check_real("optimizer.lr", self.lr, 0, open_low=True)
        _check_int("optimizer.base_batch_size", self.base_batch_size, 1)
        _check_real("optimizer.momentum", self.momentum, 0, 1, open_high=True)
        _check_real("optimizer.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise ValueError(f"optimizer.betas={list(self.betas)!r}: expected exactly 2 numbers in [0, 1)")
        for beta in self.betas:
            _check_real("optimizer.betas", beta, 0, 1, open_high=True)
        _check_real("optimizer.eps", self.eps, 0, open_low=True)


@dataclass(frozen=True)
class ScheduleConfig:
    """Warm-up then decay, as multipliers of the peak learning rate.

    ``milestones`` are fractions of the total iterations for ``decay: step`` (the paper's 16-epoch
    COCO recipe steps at 12/16 and 14/16).
    """

    warmup: str = "linear"
    warmup_iters: int = 100
    warmup_ratio: float = 0.001
    decay: str = "step"
    milestones: tuple[float, ...] = (0.75, 0.875)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("schedule.warmup", self.warmup, ("linear", "exponential", "none"))
        _check_choice("schedule.decay", self.decay, ("step", "cosine", "none"))
        _check_int("schedule.warmup_iters", self.warmup_iters, 0)
        _check_real("schedule.warmup_ratio", self.warmup_ratio, 0, 1, open_low=True)
        _check_real("schedule.gamma", self.gamma, 0, 1, open_low=True)
        _check_real("schedule.min_lr_ratio", self.min_lr_ratio, 0, 1)
        if any(not (_is_real(m) and 0 < m < 1) for m in self.milestones):
            raise ValueError(f"schedule.milestones={self.milestones!r}: fractions of the run in (0, 1) expected")


@dataclass(frozen=True)
class TrainConfig:
    """Length of the run and how often it logs, evaluates and checkpoints (in optimizer steps
    where the name says iters, else in epochs).

    ``max_consecutive_skips``: a run whose loss stays non-finite has diverged; after this many
    consecutive skipped micro-batches it stops with an error instead of skipping forever.
    ``dist_timeout_s``: the process-group timeout, how long a collective waits for a rank that is
    gone or stuck before the job fails.
    """

    epochs: int = 12
    max_iters: Optional[int] = None
    gradient_accumulation_steps: int = 1
    log_interval: int = 10
    eval_interval: int = 1
    eval_at_start: bool = False
    checkpoint_interval: int = 1
    checkpoint_iters: Optional[int] = None
    keep_checkpoints: int = 2
    skip_nonfinite_loss: bool = True
    max_consecutive_skips: int = 20
    dist_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for key in ("epochs", "gradient_accumulation_steps", "log_interval", "eval_interval", "checkpoint_interval",
                    "keep_checkpoints", "max_consecutive_skips"):
            _check_int(f"train.{key}", getattr(self, key), 1)
        for key in ("max_iters", "checkpoint_iters"):
            if getattr(self, key) is not None:
                _check_int(f"train.{key}", getattr(self, key), 1)
        _check_real("train.dist_timeout_s", self.dist_timeout_s, 0, open_low=True)


@dataclass(frozen=True)
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
    output_dir: str = "runs/default"
    seed: int = 0

    def __post_init__(self) -> None:
        for key, instead in TRAINER_OWNED_DEEPSPEED_KEYS.items():
            if key in self.deepspeed_overrides:
                raise ValueError(f"deepspeed_overrides.{key}: the trainer sets it from the experiment; set {instead} instead")
        reject_unknown_keys(ModelSpec, {k.split(".")[0]: v for k, v in self.model_overrides.items()},
                            "model_overrides", "model_overrides.")
        if not self.output_dir:
            raise ValueError("output_dir='': expected the directory of the run")
        _check_int("seed", self.seed, 0)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads an experiment file (a path, or a shipped name: ``synthetic_tiny``) or the defaults, applies ``key.sub=value`` overrides, and checks
    what the config refers to: the model definition with its overrides, the DeepSpeed JSON file and,
    for ``data.dataset: coco``, the image folders and annotation files.

    Raises:
        ValueError: one line naming the key (and the file) at fault and what is allowed.
    """
    if path is not None:
        found = find("configs", path)
        if found is None:
            raise FileNotFoundError(f"experiment config {str(path)!r}: no such file (a relative path is read from "
                                    f"{Path.cwd()}) and not a shipped name; shipped: {', '.join(shipped_names('configs'))}")
        path = found
    values = read_yaml_mapping(path, "experiment config") if path is not None else {}
    values = apply_overrides(values, parse_overrides(overrides))
    try:
        config = _build(ExperimentConfig, values, "")
        _check_references(config)
    except (TypeError, ValueError) as error:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{error}") from None
    return config


def _check_references(config: ExperimentConfig) -> None:
    """The files and definitions a config names exist and are what they should be (see ``load_config``)."""
    try:
        load_spec(config.model, config.model_overrides)
    except FileNotFoundError as error:
        raise ValueError(f"model={config.model!r}: {error}") from None
    _check_deepspeed_file(config.deepspeed)
    if config.data.dataset == "coco":
        for key in _COCO_PATH_KEYS:
            path = Path(getattr(config.data, key))
            is_dir = key.endswith("_images")
            if not (path.is_dir() if is_dir else path.is_file()):
                raise ValueError(f"data.{key}={str(path)!r}: {'image folder' if is_dir else 'annotation file'} not found")


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


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    reject_unknown_keys(cls, values, prefix.rstrip(".") or "top level", prefix)
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in values.items()}
    if cls is AGVMConfig:
        return AGVMConfig.from_dict(kwargs)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Checks a YAML value against a field's type hint; YAML lists become tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key + ".")
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list")
        inner = args[0]
        return tuple(_coerce(inner, v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value!r}: expected a finite number")
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ValueError(f"{key}={value!r}: expected {hint.__name__}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {list(choices)}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{key}={value!r}: expected an integer >= {minimum}")


def _check_real(key: str, value: Any, low: float, high: float = math.inf, *,
                open_low: bool = False, open_high: bool = False) -> None:
    """Refuses anything but a finite number in the interval from ``low`` to ``high``, stating the interval."""
    if not (
        _is_real(value) and math.isfinite(value)
        and (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    ):
        if math.isinf(high):
            allowed = f"{'>' if open_low else '>='} {low:g}"
        else:
            allowed = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{key}={value!r}: expected a finite number {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
