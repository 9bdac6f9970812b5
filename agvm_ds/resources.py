"""The definitions agvm-ds ships (``models/``, ``configs/``, ``ds_configs/``), found by name or by path.

Why one finder: an experiment names its model (``model: faster_rcnn_r18_tiny``), its DeepSpeed
config (``deepspeed: zero2_fp32``) and, on the command line, itself (``--config synthetic_tiny``),
and each must work from any directory, in a checkout and in an installed package alike. The folders
live at the repository root (where users edit them) and ``setup.py`` copies them into the package
as ``agvm_ds/shipped/<folder>`` when it builds a wheel; :func:`shipped_dir` looks in the package
first, then in the checkout around it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

__all__ = ["SUFFIXES", "find", "shipped_dir", "shipped_names"]

#: The shipped folders and the suffix of their files.
SUFFIXES = {"models": ".yaml", "configs": ".yaml", "ds_configs": ".json"}

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(kind: str) -> Path:
    """The folder of shipped ``kind`` files (a key of :data:`SUFFIXES`)."""
    installed, checkout = _PACKAGE / "shipped" / kind, _PACKAGE.parent / kind
    return installed if installed.is_dir() else checkout


def shipped_names(kind: str) -> list[str]:
    """The names (file stems) of the shipped ``kind`` files."""
    return sorted(p.stem for p in shipped_dir(kind).glob(f"*{SUFFIXES[kind]}"))


def find(kind: str, name_or_path: Union[str, os.PathLike]) -> Optional[Path]:
    """The file ``name_or_path`` names, or None.

    An existing file is taken as given (a relative path from the working directory). Otherwise a
    bare name, with or without its suffix, or a path inside the folder of that name
    (``zero2_fp32``, ``zero2_fp32.json``, ``ds_configs/zero2_fp32.json``) is the shipped file.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent not in (Path("."), Path(kind)) or path.suffix not in ("", SUFFIXES[kind]):
        return None
    shipped = shipped_dir(kind) / f"{path.stem}{SUFFIXES[kind]}"
    return shipped if shipped.is_file() else None
