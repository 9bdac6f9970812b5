"""The training system end to end: the agvm-train CLI under the real deepspeed launcher on CPU ranks,
exact resume after a kill, non-finite loss skipping, and learning on the synthetic set."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_scenarios
from distributed import free_port, run_ranks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """A few optimizer steps on a small synthetic set: the whole pipeline in seconds."""
    return [
        f"output_dir={run_dir}", f"data.root={data_root}", "data.synthetic_train=24", "data.synthetic_val=8",
        "data.synthetic_size=128", "data.scales=[112,128]", "data.max_size=128", "data.num_workers=0",
        "data.batch_size_per_rank=2", "model_overrides.min_size=128", "model_overrides.max_size=128",
        "agvm.start_iter=0", "agvm.interval=1", "train.log_interval=1", "schedule.warmup_iters=2", *extra,
    ]


def agvm_train(args: list[str], ranks: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if ranks == 1:
        command = [sys.executable, "-m", "agvm_ds.engine.cli", *args]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                   "--module", "agvm_ds.engine.cli", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def test_cli_on_two_ranks_trains_evaluates_and_plots(tmp_path):
    run = tmp_path / "run"
    output = finish(agvm_train(["--config", "configs/synthetic_tiny.yaml",
                                *tiny_overrides(run, tmp_path / "data", "train.max_iters=4")], ranks=2))
    assert "2 rank(s) x 2 images x 1 accumulation = batch 4" in output
    assert "ZeRO stage 2" in output and "AGVM on" in output
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox"]["AP50"] <= 1.0 and set(metrics["bbox"]) >= {"AP", "AP50", "AR100"}
    assert "Average Precision" in (run / "eval" / "metrics_bbox.txt").read_text()
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    last = records[-1]["agvm"]
    assert set(last) == {"backbone", "fpn", "rpn", "roi_box_head"} and last["backbone"]["factor"] == 1.0
    assert all(math.isfinite(v["phi"]) and v["phi"] > 0 for v in last.values())  # measured on 2 ranks
    assert any(abs(v["factor"] - 1.0) > 1e-3 for v in last.values())
    for name in ("agvm_phi.png", "agvm_factor.png", "loss.png", "map.png"):
        assert (run / name).stat().st_size > 5000, name
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_00000004"
    monitor_files = {p.name for p in (run / "monitor").rglob("*.csv")}
    assert "AGVM_factor_fpn.csv" in monitor_files or any("factor" in n for n in monitor_files), monitor_files


def _model_state(run: Path, tag: str) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return state


def test_killed_run_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    common = ["--config", "configs/synthetic_tiny.yaml"]
    extra = ("train.max_iters=6", "train.checkpoint_iters=2", "train.gradient_accumulation_steps=2",
             "train.eval_interval=100", "train.checkpoint_interval=100")
    finish(agvm_train([*common, *tiny_overrides(tmp_path / "straight", data, *extra)]))

    killed = tmp_path / "killed"
    process = agvm_train([*common, *tiny_overrides(killed, data, *extra)], start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "latest").exists() or \
            (killed / "checkpoints" / "latest").read_text().strip() != "iter_00000004":
        assert process.poll() is None and time.time() < deadline, "the run ended before its iteration-4 checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    output = finish(agvm_train([*common, "--resume", "auto", *tiny_overrides(killed, data, *extra)]))
    assert "resumed from" in output and "at iteration 4" in output
    straight, resumed = _model_state(tmp_path / "straight", "iter_00000006"), _model_state(killed, "iter_00000006")
    for name, value in straight["module"].items():
        assert torch.equal(value, resumed["module"][name]), name
    assert torch.equal(straight["agvm"]["modulator"]["factors"], resumed["agvm"]["modulator"]["factors"])
    assert straight["agvm"]["modulator"]["num_updates"] == resumed["agvm"]["modulator"]["num_updates"] > 0
    log = [json.loads(line)["iteration"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # records past the checkpoint were dropped, none duplicated


def test_non_finite_loss_skips_the_step_without_poisoning_agvm(tmp_path):
    result = run_ranks(train_scenarios.nan_loss_run, 2, str(tmp_path), tiny_overrides(tmp_path / "run", tmp_path / "data"))
    for rank_result in result:
        assert rank_result["skipped"] == 1  # rank 1's NaN skipped the micro-batch on both ranks
        assert rank_result["params_finite"] and rank_result["factors_finite"]
        assert rank_result["iterations"] == 5 and rank_result["agvm_updates"] == 5


def test_short_training_learns_far_above_the_untrained_model(tmp_path):
    """The default job for two epochs (about 5 minutes on 2 CPU ranks) against its own untrained start."""
    run = tmp_path / "run"
    args = ["--config", "configs/synthetic_tiny.yaml", f"output_dir={run}", f"data.root={tmp_path / 'data'}",
            "train.epochs=2", "train.eval_interval=2", "train.eval_at_start=true"]
    output = finish(agvm_train(args, ranks=2), timeout=1500)
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    untrained, trained = evals[0]["bbox"]["AP50"], evals[-1]["bbox"]["AP50"]
    assert evals[0]["iteration"] == 0 and evals[-1]["iteration"] > 0
    assert trained > max(0.15, 10 * untrained), (evals, output[-2000:])
