"""Writing a run's small records (manifests, ``latest``, configs) so that a crash or a full disk
leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, syncs it, and renames it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
