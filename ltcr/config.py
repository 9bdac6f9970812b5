"""LTCR run configuration: one YAML file of typed sections, validated at start-up, with ``key.sub=value`` overrides.

Its sections are ``agvm_ds.config_checks`` sections, as the experiment config's, so its errors read the same:
an unknown key is an error that lists the valid keys of its section; a bad value names its dotted key and what
was expected; an unknown environment lists the supported ones. ``per_agent`` makes the team heterogeneous:
entry ``r % len(per_agent)`` overrides ``agent`` keys for the agent of rank ``r``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

from pydantic import Field, field_validator, model_validator

from agvm_ds.config_checks import (
    Count,
    Expected,
    Items,
    PositiveCount,
    build,
    invalid,
    read_config,
    reject_unknown_keys,
    section,
)

from .envs import ENVIRONMENTS

__all__ = ["AgentConfig", "LTCRConfig", "TrainConfig", "TransferConfig", "load_config", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TEACHER_RULES = ("confidence", "return")
Probability = Annotated[float, Field(ge=0, le=1)]


@section
class AgentConfig:
    """One C51 agent. ``v_min``/``v_max`` left empty take the environment's support (see ltcr/envs.py).

    ``target_update`` counts gradient steps (env steps / ``train_every``); ``grad_clip: null`` turns clipping off
    and ``adam_eps`` is Adam's epsilon: CleanRL's c51.py, the reference our CleanRL-settings configs follow,
    clips nothing and uses ``0.01 / batch_size``, which damps the steps of rarely-updated weights.
    """

    hidden: Annotated[Items[PositiveCount], Field(min_length=1),
                      Expected("at least one hidden layer width")] = (128, 128)
    atoms: Annotated[int, Field(ge=2)] = 51
    v_min: Optional[float] = None
    v_max: Optional[float] = None
    gamma: Probability = 0.99
    lr: Annotated[float, Field(gt=0)] = 1e-3
    adam_eps: Annotated[float, Field(gt=0)] = 1e-8
    batch_size: PositiveCount = 64
    buffer_size: PositiveCount = 50_000
    learning_starts: Count = 1_000
    train_every: PositiveCount = 1
    target_update: PositiveCount = 500
    eps_start: Probability = 1.0
    eps_final: Probability = 0.02
    eps_decay_steps: PositiveCount = 10_000
    grad_clip: Optional[Annotated[float, Field(gt=0)]] = 10.0

    @model_validator(mode="after")
    def _check_rules(self) -> "AgentConfig":
        if self.learning_starts < self.batch_size:
            raise invalid(f"expected an integer >= batch_size ({self.batch_size})",
                          learning_starts=self.learning_starts)
        if self.v_min is not None and self.v_max is not None and not self.v_min < self.v_max:
            raise invalid("expected v_min < v_max", v_min=self.v_min, v_max=self.v_max)
        return self


@section
class TransferConfig:
    """What peers exchange every ``interval`` environment steps (see ltcr/transfer.py for the protocol)."""

    share_experience: bool = True
    distill: bool = True
    interval: PositiveCount = 100
    batch: PositiveCount = 32
    teacher: Literal[TEACHER_RULES] = "confidence"
    distill_weight: Annotated[float, Field(ge=0)] = 1.0
    budget_bytes: PositiveCount = 131_072

    @model_validator(mode="after")
    def _check_batch(self) -> "TransferConfig":
        if self.batch > self.interval:
            raise invalid(f"expected at most transfer.interval={self.interval} (the sample is drawn from the "
                          "transitions collected since the last round)", batch=self.batch)
        return self

    @property
    def enabled(self) -> bool:
        return self.share_experience or self.distill


@section
class TrainConfig:
    """Length of the run (environment steps) and how often it evaluates and checkpoints."""

    steps: PositiveCount = 50_000
    eval_interval: PositiveCount = 1_000
    eval_episodes: PositiveCount = 5
    checkpoint_interval: PositiveCount = 10_000
    keep_checkpoints: PositiveCount = 2
    threads: PositiveCount = 1
    progress: bool = True


@section
class LTCRConfig:
    """A run: the environment, the agents (``per_agent`` entries vary ``agent`` by rank), what peers exchange."""

    env: str = "CartPole-v1"
    seed: Count = 0
    device: Literal["cpu", "cuda"] = "cpu"
    output_dir: str = "runs/ltcr/default"
    agent: AgentConfig = field(default_factory=AgentConfig)
    per_agent: Items[dict[str, Any]] = ()
    transfer: TransferConfig = field(default_factory=TransferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @field_validator("env")
    @classmethod
    def _known_env(cls, env: str) -> str:
        if env not in ENVIRONMENTS:
            raise ValueError(f"unknown environment; expected one of {sorted(ENVIRONMENTS)}")
        return env

    @model_validator(mode="after")
    def _check_team(self) -> "LTCRConfig":
        v_min, v_max = self.support
        if not v_min < v_max:
            raise ValueError(f"agent.v_min={v_min!r}, agent.v_max={v_max!r} (unset ones are {self.env}'s "
                             f"[{ENVIRONMENTS[self.env].v_min:g}, {ENVIRONMENTS[self.env].v_max:g}]): "
                             "expected v_min < v_max")
        for index, entry in enumerate(self.per_agent):
            shared = sorted(set(entry) & {"atoms", "v_min", "v_max"})
            if shared:
                raise ValueError(f"per_agent[{index}].{shared[0]}: the support must be the same for every agent "
                                 "(distilled distributions live on it); set it under agent")
            reject_unknown_keys(AgentConfig, entry, f"per_agent[{index}]", f"per_agent[{index}].")
            self.agent_for(index)  # validates every entry now, not when rank `index` first needs it
        return self

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
        merged = {**dataclasses.asdict(self.agent), **self.per_agent[index]}
        return build(AgentConfig, merged, f"per_agent[{index}]", "agent.")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as YAML writes them


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> LTCRConfig:
    """Reads a YAML file (a path, or the name of a shipped config such as ``cartpole``) and applies
    ``key.sub=value`` overrides (values read as YAML 1.2: ``agent.lr=1e-3`` is a float).

    Raises:
        ValueError: one line naming the file and the key at fault and what is allowed.
    """
    path = resolve_config_path(path) if path is not None else None
    return build(LTCRConfig, read_config(path, overrides, "LTCR config"), str(path) if path is not None else "")


def resolve_config_path(path: Union[str, Path]) -> Path:
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = CONFIG_DIR / f"{candidate.name}.yaml"
    if candidate.suffix == "" and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"LTCR config not found: {path} (shipped configs: {names})")

