"""The training system end to end: the agvm-train CLI under the real deepspeed launcher on CPU ranks,
exact resume after a kill, non-finite loss skipping, and learning on the synthetic set."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import train_scenarios
from distributed import free_port, run_ranks
from launch_jobs import agvm_train, finish, tiny_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


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


def _optimizer_partition(run: Path, tag: str, rank: int) -> list[torch.Tensor]:
    path = run / "checkpoints" / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    return torch.load(path, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"]


def test_killed_run_resumes_exactly_on_every_rank(tmp_path):
    """kill -9 of the whole 2-rank job mid-run; --resume auto ends bitwise equal to an uninterrupted run:
    weights and BatchNorm statistics, each rank's optimizer partition, AGVM state, and the final metrics."""
    data = tmp_path / "data"
    common = ["--config", "configs/synthetic_tiny.yaml"]
    extra = ("train.max_iters=6", "train.checkpoint_iters=2", "train.gradient_accumulation_steps=2",
             "train.eval_interval=100", "train.checkpoint_interval=100")
    finish(agvm_train([*common, *tiny_overrides(tmp_path / "straight", data, *extra)], ranks=2))

    killed = tmp_path / "killed"
    process = agvm_train([*common, *tiny_overrides(killed, data, *extra)], ranks=2, start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "latest").exists() or \
            (killed / "checkpoints" / "latest").read_text().strip() != "iter_00000004":
        assert process.poll() is None and time.time() < deadline, "the run ended before its iteration-4 checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    output = finish(agvm_train([*common, "--resume", "auto", *tiny_overrides(killed, data, *extra)], ranks=2))
    assert "resumed from" in output and "at iteration 4" in output
    straight, resumed = _model_state(tmp_path / "straight", "iter_00000006"), _model_state(killed, "iter_00000006")
    assert any("running_mean" in name for name in straight["module"])
    for name, value in straight["module"].items():
        assert torch.equal(value, resumed["module"][name]), name
    for rank in (0, 1):
        for a, b in zip(_optimizer_partition(tmp_path / "straight", "iter_00000006", rank),
                        _optimizer_partition(killed, "iter_00000006", rank)):
            assert torch.equal(a, b), rank
    straight_metrics = (tmp_path / "straight" / "eval" / "metrics.json").read_text()
    assert straight_metrics == (killed / "eval" / "metrics.json").read_text()
    assert torch.equal(straight["agvm"]["modulator"]["factors"], resumed["agvm"]["modulator"]["factors"])
    assert straight["agvm"]["modulator"]["num_updates"] == resumed["agvm"]["modulator"]["num_updates"] > 0
    log = [json.loads(line)["iteration"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]  # records past the checkpoint were dropped, none duplicated


def test_nan_batch_is_skipped_without_poisoning_agvm_or_batchnorm(tmp_path):
    overrides = tiny_overrides(tmp_path / "run", tmp_path / "data")
    result = run_ranks(train_scenarios.nan_batch_run, 2, str(tmp_path), overrides)
    for rank_result in result:
        assert rank_result["skipped"] == 1  # rank 1's NaN skipped the micro-batch on both ranks
        assert rank_result["params_finite"] and rank_result["factors_finite"]
        assert rank_result["buffers_finite"] and rank_result["buffers_changed"]  # BN still trained on the rest
        assert rank_result["iterations"] == 5 and rank_result["agvm_updates"] == 5


def test_diverged_run_stops_with_a_clear_error_keeping_its_checkpoints(tmp_path):
    run = tmp_path / "run"
    (result,) = run_ranks(train_scenarios.diverging_run, 1, str(tmp_path), tiny_overrides(run, tmp_path / "data"))
    iteration, message = result.split("|", 1)
    assert int(iteration) == 3, message  # three good steps, then three NaN micro-batches in a row
    assert "3 consecutive micro-batches had a non-finite loss" in message and "--resume auto" in message
    assert (run / "checkpoints" / "latest").read_text() == "iter_00000003"
    assert (run / "checkpoints" / "iter_00000003" / "manifest.json").is_file()


def test_a_diverged_run_exits_with_its_own_status_so_sweeps_can_tell_it_from_a_failure(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from agvm_ds.commands import train as cli
    from agvm_ds.engine import trainer

    class DivergingTrainer:
        world, rank, run_dir, engine = 1, 0, tmp_path, SimpleNamespace(global_steps=0)

        def __init__(self, config, resume=None):
            pass

        def fit(self):
            raise trainer.TrainingDiverged("training diverged: 20 consecutive micro-batches had a non-finite loss")

    monkeypatch.setattr(trainer, "Trainer", DivergingTrainer)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)  # a world of one, restored afterwards
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["--config", "configs/synthetic_tiny.yaml"]) == cli.EXIT_DIVERGED == 3
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert capsys.readouterr().err.strip() == ("agvm-train: training diverged: 20 consecutive micro-batches had a "
                                               "non-finite loss")


def test_every_rank_holds_the_same_batchnorm_statistics_after_training(tmp_path):
    stats = run_ranks(train_scenarios.running_stats_after_training, 2, str(tmp_path),
                      tiny_overrides(tmp_path / "run", tmp_path / "data"))
    assert len(stats[0]) > 40 and any(b.is_floating_point() and b.abs().sum() > 0 for b in stats[0])
    for a, b in zip(*stats):
        assert torch.equal(a, b)


def test_logged_loss_is_the_mean_over_the_logging_window(tmp_path):
    every_step, every_second = run_ranks(train_scenarios.losses_at_two_log_intervals, 1, str(tmp_path),
                                         tiny_overrides(tmp_path / "unused", tmp_path / "data"))[0]
    assert [r["iteration"] for r in every_second] == [2, 4]
    for i, record in enumerate(every_second):
        window = every_step[2 * i:2 * i + 2]
        for key in ("loss", "loss_classifier", "loss_rpn_box_reg"):
            assert record[key] == pytest.approx((window[0][key] + window[1][key]) / 2, rel=1e-6), key


def test_metrics_do_not_depend_on_the_number_of_evaluating_ranks(tmp_path):
    """A 2-rank run's final evaluation equals the evaluation of its checkpoint resumed in one process
    (a world-size change: DeepSpeed's universal checkpoint re-partitions the ZeRO-2 optimizer state)."""
    run, data = tmp_path / "run", tmp_path / "data"
    args = ["--config", "configs/synthetic_tiny.yaml", *tiny_overrides(run, data, "train.max_iters=3",
                                                                        "train.eval_interval=100")]
    finish(agvm_train(args, ranks=2))
    two_ranks = json.loads((run / "eval" / "metrics.json").read_text())
    (run / "eval" / "metrics.json").unlink()
    output = finish(agvm_train([*args, "--resume", "auto"], ranks=1))
    assert "checkpoint written by 2 rank(s), resumed on 1" in output
    one_rank = json.loads((run / "eval" / "metrics.json").read_text())
    assert two_ranks["bbox"]["AR100"] > 0
    for name, value in two_ranks["bbox"].items():
        assert one_rank["bbox"][name] == pytest.approx(value, abs=1e-9), name


def test_a_failed_start_leaves_no_shared_memory(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    port = free_port()
    args = ["--config", "configs/synthetic_tiny.yaml", "data.dataset=coco", f"data.train_images={tmp_path}",
            f"data.val_images={tmp_path}", f"data.train_ann={bad}", f"data.val_ann={bad}",
            f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module",
                              "agvm_ds.commands.train", *args],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode != 0 and "bad.json" in process.stdout + process.stderr
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


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
