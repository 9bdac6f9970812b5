"""What every config loader of agvm-ds shares: known keys, YAML with YAML 1.2 numbers, a file holding a mapping,
and the one way ``key.sub=value`` overrides are parsed and applied (experiments, model specs, DeepSpeed configs)."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import IO, Any, Mapping, Sequence, Union

import yaml

__all__ = ["apply_overrides", "parse_overrides", "parse_yaml", "reject_unknown_keys", "read_yaml_mapping", "yaml_problem"]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` is a number, not the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(source: Union[str, IO[str]]) -> Any:
    """``yaml.safe_load`` that also reads exponent notation without a dot (``1e-3``, ``5E4``) as floats."""
    return yaml.load(source, Loader=_Loader)


def reject_unknown_keys(cls: type, values: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Raises ValueError naming each unknown key (with its dotted ``prefix``) and listing the valid ones."""
    valid = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; valid keys are {valid}")


def read_yaml_mapping(path: Union[str, os.PathLike], what: str) -> dict[str, Any]:
    """Loads a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            values = parse_yaml(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{what} {path}: not valid YAML ({yaml_problem(error)})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path}: expected a mapping at the top level")
    return values


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where it is (PyYAML's own message spans several)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem:
        mark = error.problem_mark
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else error.problem
    return " ".join(str(error).split())


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``key.sub=value`` strings as {dotted key: value}, values read as YAML (``1e-3`` is a float)."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        try:
            parsed[key.strip()] = parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({yaml_problem(error)})") from None
    return parsed


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``values`` with ``overrides`` applied.

    A dotted key sets a nested value, creating the mappings on its way
    (``{"detector_kwargs.rpn_batch_size_per_image": 64}``); a mapping value is merged, recursively,
    into the mapping it replaces (``{"zero_optimization": {"stage": 3}}`` keeps the other ZeRO keys).
    """
    merged = copy.deepcopy(dict(values))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = merged
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ValueError(f"override {key!r}: {'.'.join(parents[:depth + 1])} is not a mapping")
            node = node[part]
        node[leaf] = _merge(node.get(leaf), value)
    return merged


def _merge(base: Any, value: Any) -> Any:
    if isinstance(base, Mapping) and isinstance(value, Mapping):
        return {**base, **{key: _merge(base.get(key), inner) for key, inner in value.items()}}
    return copy.deepcopy(value)
