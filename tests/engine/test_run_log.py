"""The run's JSON-lines history stays strict JSON, whatever numbers training produced."""
from __future__ import annotations

import json
import math

from agvm_ds.engine.run_log import RunLog, read_records


def strict_records(path):
    """Parses like a strict JSON reader: NaN / Infinity / -Infinity are errors."""
    def refuse(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.train({"iteration": 5, "loss": math.nan, "lr": 0.1,
               "agvm": {"fpn": {"factor": math.inf, "phi": [1.0, -math.inf]}}})
    log.eval({"iteration": 5, "bbox": {"AP": float("nan"), "AP50": 0.25}})
    train = strict_records(tmp_path / "train_log.jsonl")
    assert train == [{"iteration": 5, "loss": None, "lr": 0.1, "agvm": {"fpn": {"factor": None, "phi": [1.0, None]}}}]
    assert strict_records(tmp_path / "eval_log.jsonl") == [{"iteration": 5, "bbox": {"AP": None, "AP50": 0.25}}]
    (back,) = read_records(tmp_path / "train_log.jsonl")
    assert math.isnan(back["loss"]) and back["lr"] == 0.1 and math.isnan(back["agvm"]["fpn"]["phi"][1])


def test_truncating_for_a_resume_keeps_the_file_strict(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    (tmp_path / "train_log.jsonl").write_text('{"iteration": 5, "loss": NaN}\n{"iteration": 10, "loss": 1.0}\n'
                                              '{"iteration": 15, "loss": 0.5}\n')  # a log from an older version
    log.truncate_after(10)
    assert strict_records(tmp_path / "train_log.jsonl") == [{"iteration": 5, "loss": None},
                                                            {"iteration": 10, "loss": 1.0}]
