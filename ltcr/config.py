"""LTCR run configuration: one YAML file of typed sections, validated at start-up, with ``key.sub=value`` overrides.

An unknown key is an error that lists the valid keys of its section; a bad value names its dotted key and what
was expected; an unknown environment lists the supported ones. ``per_agent`` makes the team heterogeneous:
entry ``r % len(per_agent)`` overrides ``agent`` keys for the agent of rank ``r``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from .envs import ENVIRONMENTS

__all__ = ["AgentConfig", "LTCRConfig", "TrainConfig", "TransferConfig", "load_config", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TEACHER_RULES = ("confidence", "return")


@dataclass(frozen=True)
class AgentConfig:
    """One C51 agent. ``v_min``/``v_max`` left empty take the environment's support (see ltcr/envs.py)."""

    hidden: tuple[int, ...] = (128, 128)
    atoms: int = 51
    v_min: Optional[float] = None
    v_max: Optional[float] = None
    gamma: float = 0.99
    lr: float = 1e-3
    batch_size: int = 64
    buffer_size: int = 50_000
    learning_starts: int = 1_000
    train_every: int = 1
    target_update: int = 500
    eps_start: float = 1.0
    eps_final: float = 0.02
    eps_decay_steps: int = 10_000
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        if not self.hidden:
            raise ValueError("agent.hidden=[]: expected at least one hidden layer width")
        for width in self.hidden:
            _check_int("agent.hidden", width, 1)
        _check_int("agent.atoms", self.atoms, 2)
        for key in ("batch_size", "buffer_size", "train_every", "target_update", "eps_decay_steps"):
            _check_int(f"agent.{key}", getattr(self, key), 1)
        _check_int("agent.learning_starts", self.learning_starts, self.batch_size)
        _check_real("agent.gamma", self.gamma, 0.0, 1.0)
        _check_real("agent.lr", self.lr, 0.0, open_low=True)
        _check_real("agent.grad_clip", self.grad_clip, 0.0, open_low=True)
        for key in ("eps_start", "eps_final"):
            _check_real(f"agent.{key}", getattr(self, key), 0.0, 1.0)
        if self.v_min is not None and self.v_max is not None and not self.v_min < self.v_max:
            raise ValueError(f"agent.v_min={self.v_min!r}, agent.v_max={self.v_max!r}: expected v_min < v_max")


@dataclass(frozen=True)
class TransferConfig:
    """What peers exchange every ``interval`` environment steps (see ltcr/transfer.py for the protocol)."""

    share_experience: bool = True
    distill: bool = True
    interval: int = 100
    batch: int = 32
    teacher: str = "confidence"
    distill_weight: float = 1.0
    budget_bytes: int = 131_072

    def __post_init__(self) -> None:
        _check_int("transfer.interval", self.interval, 1)
        _check_int("transfer.batch", self.batch, 1)
        if self.batch > self.interval:
            raise ValueError(f"transfer.batch={self.batch}: expected at most transfer.interval={self.interval} "
                             "(the sample is drawn from the transitions collected since the last round)")
        if self.teacher not in TEACHER_RULES:
            raise ValueError(f"transfer.teacher={self.teacher!r}: expected one of {list(TEACHER_RULES)}")
        _check_real("transfer.distill_weight", self.distill_weight, 0.0)
        _check_int("transfer.budget_bytes", self.budget_bytes, 1)

    @property
    def enabled(self) -> bool:
        return self.share_experience or self.distill


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50_000
    eval_interval: int = 1_000
    eval_episodes: int = 5
    checkpoint_interval: int = 10_000
    keep_checkpoints: int = 2
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        for key in ("steps", "eval_interval", "eval_episodes", "checkpoint_interval", "keep_checkpoints", "threads"):
            _check_int(f"train.{key}", getattr(self, key), 1)


@dataclass(frozen=True)
class LTCRConfig:
    env: str = "CartPole-v1"
    seed: int = 0
    device: str = "cpu"
    output_dir: str = "runs/ltcr/default"
    agent: AgentConfig = field(default_factory=AgentConfig)
    per_agent: tuple[dict, ...] = ()
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.env not in ENVIRONMENTS:
            raise ValueError(f"env={self.env!r}: unknown environment; expected one of {sorted(ENVIRONMENTS)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected one of ['cpu', 'cuda']")
        _check_int("seed", self.seed, 0)
        v_min, v_max = self.support
        if not v_min < v_max:
            raise ValueError(f"agent.v_min={v_min!r}, agent.v_max={v_max!r} (unset ones are {self.env}'s "
                             f"[{ENVIRONMENTS[self.env].v_min:g}, {ENVIRONMENTS[self.env].v_max:g}]): "
                             "expected v_min < v_max")
        for index, entry in enumerate(self.per_agent):
            shared = sorted(set(entry) & {"atoms", "v_min", "v_max"}) if isinstance(entry, Mapping) else []
            if shared:
                raise ValueError(f"per_agent[{index}].{shared[0]}: the support must be the same for every agent "
                                 "(distilled distributions live on it); set it under agent")
            self.agent_for(index)  # validates every entry now, not when rank `index` first needs it

    @property
    def support(self) -> tuple[float, float]:
        """``[v_min, v_max]`` of every agent's value distributions: the agent section's, else the environment's."""
        spec = ENVIRONMENTS[self.env]
        return (spec.v_min if self.agent.v_min is None else self.agent.v_min,
                spec.v_max if self.agent.v_max is None else self.agent.v_max)

    def agent_for(self, rank: int) -> AgentConfig:
        """The agent of ``rank``: ``agent`` with entry ``rank % len(per_agent)`` of ``per_agent`` applied."""
        if not self.per_agent:
            return self.agent
        index = rank % len(self.per_agent)
        overrides = self.per_agent[index]
        if not isinstance(overrides, Mapping):
            raise ValueError(f"per_agent[{index}]={overrides!r}: expected a mapping of agent keys")
        merged = {**dataclasses.asdict(self.agent), **overrides}
        try:
            return _build(AgentConfig, merged, f"per_agent[{index}].")
        except ValueError as error:
            where = f"per_agent[{index}]"
            raise ValueError(str(error) if str(error).startswith(where) else f"{where}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as YAML writes them


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> LTCRConfig:
    """Reads a YAML file (a path, or the name of a shipped config such as ``cartpole``) and applies overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML") from None
        _set_dotted(values, key.strip(), value)
    try:
        return _build(LTCRConfig, values, "")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}" if path is not None else str(error)) from None


def resolve_config_path(path: Union[str, Path]) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = CONFIG_DIR / f"{candidate.name}.yaml"
    if candidate.suffix == "" and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"LTCR config not found: {path} (shipped configs: {names})")


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


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {values!r}")
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; valid keys are {valid}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], value, prefix + name) for name, value in values.items()})


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Checks a YAML value against a field's type hint; YAML lists become tuples, sections dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key + ".")
    if origin is Union:
        if value is None:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r}: expected a list")
        return tuple(_coerce(args[0], item, key) for item in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if hint is float and _is_int(value):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ValueError(f"{key}={value!r}: expected {hint.__name__}")
    return value


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{key}={value!r}: expected an integer >= {minimum}")


def _check_real(key: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (open_low and value == low) or value > high:
        bound = f"> {low:g}" if open_low else (f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]")
        raise ValueError(f"{key}={value!r}: expected a finite number {bound}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
