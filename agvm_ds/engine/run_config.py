"""What a run directory records of its config, and which changes a resume may make.

Why: a checkpoint holds the state of one model trained by one optimizer on one set of classes.
Resuming it with another model, optimizer or class list either fails deep inside
``load_state_dict`` or, worse, silently loads AdamW moments into SGD. So a resume compares the
config the checkpoint recorded (``<tag>/config.json``, written with each checkpoint; for older
checkpoints the run's ``config.json``) with the new one before anything is loaded or written:
a difference in a :data:`FIXED_KEYS` key refuses the start in one line naming each key; any other
difference (epochs, intervals, the lr schedule, ...) is applied and listed.

The run's ``config.json`` is the config it runs with now; it is replaced only by an accepted start,
and every accepted start appends its config and its changes to ``config_history.jsonl``, so the
record of what each checkpoint was trained with is never lost.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import CorruptFile, ResumeRefused
from .files import write_atomically

__all__ = ["CONFIG_FILE", "FIXED_KEYS", "HISTORY_FILE", "ConfigChanges", "compare", "read_recorded", "record_start"]

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"

#: Keys (and everything under them) that a resume may not change, and why.
FIXED_KEYS = {
    "model": "the architecture the weights belong to",
    "model_overrides": "the architecture the weights belong to",
    "optimizer.name": "the optimizer whose state the checkpoint holds",
    "data.dataset": "the data set whose classes the heads predict",
    "data.classes": "the classes the heads predict",
    "deepspeed.zero_stage": "the layout of the optimizer state",
}


@dataclass(frozen=True)
class ConfigChanges:
    """The differences between a checkpoint's config and a new one: ``{dotted key: (old, new)}``."""

    fixed: dict[str, tuple[Any, Any]]
    allowed: dict[str, tuple[Any, Any]]

    def describe_allowed(self) -> str:
        return ", ".join(f"{key} {_short(old)} -> {_short(new)}" for key, (old, new) in self.allowed.items())

    def refusal(self, checkpoint: str, source: Path) -> ResumeRefused:
        keys = "; ".join(f"{key}: {_short(old)} in the checkpoint, {_short(new)} now ({FIXED_KEYS[_fixed_root(key)]})"
                         for key, (old, new) in self.fixed.items())
        return ResumeRefused(f"cannot resume {checkpoint} (config recorded in {source}): {keys}. These cannot change "
                             "on resume: start a new run in another output_dir, or set them back")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fixed_root(key: str) -> Optional[str]:
    for root in FIXED_KEYS:
        if key == root or key.startswith(root + "."):
            return root
    return None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; an empty mapping has no keys (an override added to
    ``model_overrides: {}`` is one changed key)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> ConfigChanges:
    """The keys whose values differ between two ``to_dict()``-shaped configs (plus any derived keys
    such as ``data.classes`` the caller added to both), split into fixed and allowed ones."""
    old_flat, new_flat = _flatten(recorded), _flatten(new)
    fixed, allowed = {}, {}
    for key in sorted(old_flat.keys() | new_flat.keys()):
        old, now = old_flat.get(key), new_flat.get(key)
        if old != now:
            (fixed if _fixed_root(key) else allowed)[key] = (old, now)
    return ConfigChanges(fixed, allowed)


def read_recorded(path: Path) -> dict[str, Any]:
    """A recorded config (``config.json`` of a run or of a checkpoint tag), checked to be one."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CorruptFile(f"{path}: not a valid JSON config ({error}); it is the record of what the run trained "
                          "with, so restore it from config_history.jsonl") from None
    if not isinstance(values, dict) or "model" not in values:
        raise CorruptFile(f"{path}: not an experiment config (expected a JSON object with 'model')")
    return values


def record_start(run_dir: Path, config: Mapping[str, Any], event: str, checkpoint: Optional[str] = None,
                 changes: Optional[ConfigChanges] = None) -> None:
    """Writes ``config.json`` and appends the start to the history; an older run's config.json that
    predates the history is appended first, so it is not lost when replaced."""
    config_file, history = run_dir / CONFIG_FILE, run_dir / HISTORY_FILE
    entries = []
    if not history.exists() and config_file.exists():
        entries.append({"event": "recorded before this history", "config": read_recorded(config_file)})
    entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, "checkpoint": checkpoint,
                    "changed": {key: list(pair) for key, pair in (changes.allowed if changes else {}).items()},
                    "config": dict(config)})
    with open(history, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(entry) + "\n" for entry in entries))
    write_atomically(config_file, json.dumps(config, indent=2))

