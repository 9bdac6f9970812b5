"""The history of a run as JSON lines, written by rank 0: what plots and resumed runs read back.

DeepSpeed's monitor (TensorBoard/CSV, from the ``ds_configs`` sections) receives the same scalars
for live viewing; these files are the run's own record, independent of which monitor is enabled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

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
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def train(self, record: dict[str, Any]) -> None:
        self._append(TRAIN_FILE, record)

    def eval(self, record: dict[str, Any]) -> None:
        self._append(EVAL_FILE, record)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.run_dir / name, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return list(_lines(path))


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
