"""The history of a run as JSON lines, written by rank 0: what plots and resumed runs read back.

DeepSpeed's monitor (TensorBoard/CSV, from the ``ds_configs`` sections) receives the same scalars
for live viewing; these files are the run's own record, independent of which monitor is enabled.
They are strict JSON lines: a non-finite number (a skipped NaN loss, an infinite ratio) is written
as ``null``, since ``NaN`` and ``Infinity`` are not JSON and strict readers (jq, JavaScript,
Go) reject them; :func:`read_records` reads a ``null`` back as NaN.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["RunLog", "read_records"]

TRAIN_FILE = "train_log.jsonl"
EVAL_FILE = "eval_log.jsonl"


class RunLog:
    """Appends records to ``<run_dir>/train_log.jsonl`` and ``eval_log.jsonl`` (no-op off rank 0).

    A resumed run first drops the records past the iteration it resumes from, so the history
    stays one consistent curve.
    """

    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, iteration: int) -> None:
        if not self.enabled:
            return
        for name in (TRAIN_FILE, EVAL_FILE):
            path = self.run_dir / name
            if path.exists():
                kept = [r for r in read_records(path) if r["iteration"] <= iteration]
                path.write_text("".join(_json_line(r) for r in kept))

    def train(self, record: dict[str, Any]) -> None:
        self._append(TRAIN_FILE, record)

    def eval(self, record: dict[str, Any]) -> None:
        self._append(EVAL_FILE, record)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.run_dir / name, "a", encoding="utf-8") as f:
                f.write(_json_line(record))


def _json_line(record: dict[str, Any]) -> str:
    finite = _map_leaves(record, lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)
    return json.dumps(finite, allow_nan=False) + "\n"


def _map_leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _map_leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_leaves(v, leaf) for v in value]
    return leaf(value)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log file, a ``null`` read back as NaN (records hold numbers; NaN keeps
    ``math.isfinite`` the one test readers need)."""
    path = Path(path)
    if not path.exists():
        return []
    return list(_lines(path))


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield _map_leaves(json.loads(line), lambda v: math.nan if v is None else v)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
