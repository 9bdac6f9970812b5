"""Experiment configuration: one YAML file, typed sections, command-line overrides.

Every section is a frozen dataclass, so a typo is an error at start-up that lists the valid keys,
and a value of the wrong type names its dotted key. ``key.sub=value`` overrides are parsed as YAML
scalars (``lr=0.02``, ``agvm.enabled=false``, ``data.scales=[224,256]``).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import yaml


from ..agvm import AGVMConfig
from ..config_checks import read_yaml_mapping, reject_unknown_keys

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
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

    def __post_init__(self) -> None:
        _check_choice("data.dataset", self.dataset, ("synthetic", "coco"))
        _check_positive("data.batch_size_per_rank", self.batch_size_per_rank)
        if self.dataset == "coco":
            missing = [k for k in ("train_images", "train_ann", "val_images", "val_ann") if not getattr(self, k)]
            if missing:
                raise ValueError(f"data.dataset=coco needs data.{', data.'.join(missing)}")


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
        _check_positive("optimizer.lr", self.lr)
        _check_positive("optimizer.base_batch_size", self.base_batch_size)


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
        if any(not 0 < m < 1 for m in self.milestones):
            raise ValueError(f"schedule.milestones={self.milestones!r}: fractions of the run in (0, 1) expected")


@dataclass(frozen=True)
class TrainConfig:
    """Length of the run and how often it logs, evaluates and checkpoints (in optimizer steps
    where the name says iters, else in epochs)."""

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

    def __post_init__(self) -> None:
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. ``model`` names a definition in ``models/`` (or a YAML path) and
    ``model_overrides`` changes any of its fields; ``deepspeed`` is a JSON file from ``ds_configs/``
    whose batch sizes the trainer fills in, with ``deepspeed_overrides`` merged on top."""

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

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def load_config(path: Optional[Union[str, os.PathLike]] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Reads a YAML experiment file (or the defaults) and applies ``key.sub=value`` overrides."""
    values = read_yaml_mapping(path, "experiment config") if path is not None else {}
    for key, value in parse_overrides(overrides).items():
        _set_dotted(values, key, value)
    try:
        return _build(ExperimentConfig, values, "")
    except (TypeError, ValueError) as error:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{error}") from None


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {part!r} is not a section")
    node[leaf] = value


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


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key}={value!r}: expected a number > 0")
