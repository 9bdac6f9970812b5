"""The two checks every config loader of agvm-ds shares: known keys, and a YAML file holding a mapping."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Union

import yaml

__all__ = ["reject_unknown_keys", "read_yaml_mapping"]


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
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path}: expected a mapping at the top level")
    return values
