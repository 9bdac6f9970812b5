"""What every config loader of agvm-ds shares: known keys, YAML with YAML 1.2 numbers, a file holding a mapping."""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import IO, Any, Mapping, Union

import yaml

__all__ = ["parse_yaml", "reject_unknown_keys", "read_yaml_mapping", "yaml_problem"]


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
