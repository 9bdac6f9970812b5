"""The large-batch evidence tools: variance_by_batch's streamed estimators against brute force on stacked
micro-batch gradients and its smoke run; large_batch's plan (lr scaling, warm-up, AGVM start, seeds, resume)
and its smoke sweep, which skips finished runs when started again."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agvm_ds.agvm.estimator import GradientMoments, moments_from_gradients, noise_scale, variance_proxy
from agvm_ds.engine.config import load_config
from agvm_ds.engine.schedule import peak_lr
from agvm_ds.engine.trained_run import TrainedRun, consolidated_state_dict

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import large_batch  # noqa: E402
import variance_by_batch  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- variance_by_batch.py ------------------------------------------------------------------------


def test_streamed_windows_equal_the_estimators_on_stacked_gradients():
    torch.manual_seed(0)
    micro_batches, sizes = 6, (50, 7)
    gradients = [[torch.randn(size) + (1.0 if i == 0 else 0.3) for i, size in enumerate(sizes)]
                 for _ in range(2 * micro_batches)]
    window = variance_by_batch.BatchWindow(micro_batches, len(sizes))
    for g in gradients:
        window.add(g)

    assert len(window.estimates) == 2  # two consecutive, disjoint batches
    for w, estimate in enumerate(window.estimates):  # the windows sum in fp32: rel 1e-6
        for i in range(len(sizes)):
            stacked = torch.stack([g[i] for g in gradients[w * micro_batches:(w + 1) * micro_batches]])
            a, b = moments_from_gradients(stacked)
            moments = GradientMoments(torch.tensor([a]), torch.tensor([b]), micro_batches)
            assert float(estimate["scalar"][i]) == pytest.approx(float(variance_proxy(moments)[0]), rel=1e-6)
            assert float(estimate["noise_scale"][i]) == pytest.approx(float(noise_scale(moments)[0]), rel=1e-6)
            first, second = stacked[:3].sum(0).double(), stacked[3:].sum(0).double()
            cosine = float(first @ second / (first.norm() * second.norm()))
            assert float(estimate["halves"][i]) == pytest.approx(1 - cosine, rel=1e-6)


def test_a_batch_must_split_into_two_equal_halves_of_micro_batches():
    with pytest.raises(ValueError, match="even number"):
        variance_by_batch.BatchWindow(3, 1)
    with pytest.raises(ValueError, match="--batches 12: must be a multiple of 2 x the micro-batch"):
        variance_by_batch.check_batches([8, 12], micro=4, train_batch=8)


@pytest.mark.slow
def test_variance_smoke_measures_every_module_batch_and_point(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/variance_by_batch.py", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches [4, 8] (M = [2, 4] micro-batches), 2 data orders x 8 images per point" in proc.stdout

    rows = _rows(tmp_path / "phi_by_batch.csv")
    modules = ["backbone", "fpn", "rpn", "roi_box_head"]
    assert [(r["iteration"], r["batch"], r["module"]) for r in rows] == [
        (str(it), str(batch), m) for it in (0, 1) for batch in (4, 8) for m in modules]
    for r in rows:
        # 8 images per data order: 2 windows of batch 4, 1 of batch 8; 2 data orders
        assert int(r["estimates"]) == {"4": 4, "8": 2}[r["batch"]]
        for estimator in ("phi_scalar", "phi_halves"):
            assert 0.0 <= float(r[estimator]) <= 2.0
        if r["module"] == "backbone":
            assert float(r["phi_over_backbone"]) == 1.0
    assert (tmp_path / "phi_by_iteration.png").stat().st_size > 0
    assert (tmp_path / "phi_by_batch.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("config, modules", [
    ("synthetic_semseg_tiny", ["backbone", "fpn", "decode_head"]),
    ("synthetic_panoptic_tiny", ["backbone", "fpn", "rpn", "roi_box_head", "mask_head", "semantic_head"]),
])
def test_variance_smoke_measures_the_segmenters_modules(config, modules, tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/variance_by_batch.py", "--smoke", "--config", config,
                           "--out", str(tmp_path)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "phi_by_batch.csv")
    assert [(r["batch"], r["module"]) for r in rows if r["iteration"] == "0"] == [
        (str(batch), m) for batch in (4, 8) for m in modules]
    assert all(0.0 < float(r["phi_scalar"]) <= 2.0 for r in rows)


# --- large_batch.py ------------------------------------------------------------------------------

LR = {"sgd": 0.02, "adamw": 1e-3, "lamb": 4e-3}


def test_plan_scales_lr_and_warmup_with_the_batch_and_starts_agvm_after_warmup():
    runs = large_batch.plan(16, 16, list(large_batch.OPTIMIZERS), 2, LR, {16: 4800, 256: 300}, ranks=1, per_rank=4,
                            warmup_fraction=1 / 8)
    by_name = {run.name: run for run in runs}
    # 8 optimizers at B and at 16B, a second seed for every 16B run
    assert len(runs) == 8 + 2 * 8 and {"b256_sgd_s1", "b256_lamb_agvm_s1"} <= set(by_name)
    assert "b16_sgd_s1" not in by_name
    assert by_name["b256_sgd_s0"].peak_lr == pytest.approx(0.32)  # linear
    assert by_name["b256_adamw_agvm_s0"].peak_lr == pytest.approx(4e-3)  # sqrt(16) x 1e-3
    assert by_name["b256_lamb_s0"].peak_lr == pytest.approx(1.6e-2)
    # warm-up covers the same images at both batches; AGVM starts 100/920 of the warm-up after it
    assert (by_name["b16_sgd_s0"].warmup_iters, by_name["b256_sgd_s0"].warmup_iters) == (600, 38)
    assert by_name["b16_sgd_agvm_s0"].agvm_start == 600 + 66 and by_name["b16_sgd_s0"].agvm_start is None
    for run in runs:
        config = load_config(REPO / "configs/large_batch_synthetic.yaml", run.overrides)  # every key valid
        assert config.data.batch_size_per_rank * config.train.gradient_accumulation_steps == run.batch
        assert peak_lr(config.optimizer, run.batch) == pytest.approx(run.peak_lr)  # the trainer's own rule
        assert config.agvm.enabled == ("_agvm" in run.optimizer)
        guard = large_batch.OPTIMIZERS[run.optimizer].guard
        assert config.agvm.guard == run.optimizer.endswith(("_guard", "_fallback"))
        assert config.agvm.guard_action == (guard or "hold")
        assert config.agvm.precondition == (config.optimizer.name == "adamw")


def test_the_cpu_recipe_gives_at_least_300_steps_at_16b_with_two_micro_batch_gradients_at_b(tmp_path):
    config = load_config(REPO / "configs/large_batch_cpu.yaml", [f"data.root={tmp_path}"])
    assert large_batch.steps_per_run(config, [2, 32], ranks=1) == {2: 5040, 32: 304}
    assert config.data.batch_size_per_rank == 1  # B = 2: accumulation 2, two gradients for AGVM's estimate


def test_runs_select_a_subset_by_name_pattern_and_a_pattern_matching_none_is_an_error():
    runs = large_batch.plan(2, 16, list(large_batch.OPTIMIZERS), 2, LR, {2: 10, 32: 1}, 1, 1, 1 / 8)
    chosen = large_batch.select(runs, ["b32_*", "b2_sgd_s0"])
    assert [run.name for run in chosen] == ["b2_sgd_s0"] + [run.name for run in runs if run.batch == 32]
    with pytest.raises(ValueError, match=r"'b64_\*' matches no run of this sweep; its runs: b2_sgd_s0, "):
        large_batch.select(runs, ["b64_*"])


def test_agvm_rows_summarise_each_agvm_runs_logged_phi_and_factors_per_module(tmp_path):
    def record(phi, factor):
        return {"iteration": 1,
                "agvm": {"backbone": {"factor": 1.0, "phi": phi}, "rpn": {"factor": factor, "phi": phi}}}

    log = tmp_path / "runs/b32_sgd_agvm_s0" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps(r) for r in (record(None, 1.0), record(0.2, 1.5), record(0.4, 1.2))))
    results = [{"run": "b32_sgd_s0", "optimizer": "sgd"}, {"run": "b32_sgd_agvm_s0", "optimizer": "sgd_agvm"}]
    rows = large_batch.agvm_rows(results, tmp_path)  # runs without AGVM have no rows
    assert [(r["run"], r["module"], r["phi_logged"]) for r in rows] == [("b32_sgd_agvm_s0", "backbone", 2),
                                                                         ("b32_sgd_agvm_s0", "rpn", 2)]
    rpn = rows[1]
    assert rpn["phi_mean"] == pytest.approx(0.3) and rpn["phi_std"] == pytest.approx(0.1414, abs=1e-4)
    assert (rpn["factor_final"], rpn["factor_min"], rpn["factor_max"]) == (1.2, 1.0, 1.5)


def test_a_diverged_run_is_a_result_without_final_ap_and_the_summary_counts_it(tmp_path):
    run = large_batch.plan(2, 16, ["sgd"], 2, LR, {2: 10, 32: 1}, 1, 1, 1 / 8)[1]
    (tmp_path / "eval_log.jsonl").write_text(json.dumps({"epoch": 1, "iteration": 5, "bbox": {"AP": 0.1, "AP50": 0.2}}))
    diverged = large_batch.result_of(run, tmp_path, diverged=True)
    assert diverged["status"] == "diverged" and math.isnan(diverged["AP"]) and diverged["AP_by_epoch"] == [0.1]
    finished = large_batch.result_of(run, tmp_path)
    assert finished["status"] == "finished" and finished["AP"] == 0.1
    (row,) = large_batch.summarise([diverged, finished])
    assert (row["seeds"], row["diverged"], row["AP"]) == (2, 1, 0.1)  # the mean over the seeds that finished
    (only_diverged,) = large_batch.summarise([diverged])
    assert only_diverged["diverged"] == 1 and math.isnan(only_diverged["AP"])


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path):
    args = large_batch.parse_args(["--out", str(tmp_path)])
    run = large_batch.plan(16, 16, ["sgd"], 1, LR, {16: 10, 256: 1}, 1, 4, 1 / 8)[0]
    assert "--resume" not in large_batch.command(run, args, tmp_path / "fresh", port=29600)
    (tmp_path / "started").mkdir()
    assert large_batch.command(run, args, tmp_path / "started", port=29600)[3:5] == ["--resume", "auto"]


def test_runs_side_by_side_get_their_own_master_port():
    args = large_batch.parse_args(["--launcher", "deepspeed", "--ranks", "2", "--jobs", "2"])
    run = large_batch.plan(16, 16, ["sgd"], 1, LR, {16: 10, 256: 1}, 2, 4, 1 / 8)[0]
    ports = {large_batch.command(run, args, Path("x"), port=args.master_port + i)[4] for i in (1, 2)}
    assert ports == {"29518", "29519"}


@pytest.mark.slow
def test_smoke_sweep_collects_ap_and_skips_finished_runs_when_started_again(tmp_path):
    command = [sys.executable, "benchmarks/large_batch.py", "--smoke", "--optimizers", "sgd_agvm",
               "--seeds-large", "1", "--jobs", "2", "--out", str(tmp_path)]  # both runs side by side
    first = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "optimizer steps per run: batch 2: 1, batch 32: 1" in first.stdout
    assert first.stdout.count(": finished\n") == 2
    runs = _rows(tmp_path / "runs.csv")
    assert [(r["run"], r["steps"]) for r in runs] == [("b2_sgd_agvm_s0", "1"), ("b32_sgd_agvm_s0", "1")]
    assert all(0.0 <= float(r["AP"]) <= 1.0 for r in runs)
    config = json.loads((tmp_path / "runs/b32_sgd_agvm_s0/config.json").read_text())
    assert config["train"]["gradient_accumulation_steps"] == 16 and config["optimizer"]["lr_scaling"] == "linear"
    assert [r["seeds"] for r in _rows(tmp_path / "summary.csv")] == ["1", "1"]
    assert {(r["run"], r["module"]) for r in _rows(tmp_path / "agvm.csv")} == {
        (run, module) for run in ("b2_sgd_agvm_s0", "b32_sgd_agvm_s0")
        for module in ("backbone", "fpn", "rpn", "roi_box_head")}
    assert all((tmp_path / name).is_file() for name in ("ap_by_epoch.png", "ap_by_batch.png", "agvm_factors.png"))

    # variance_by_batch --run measures a run's newest complete checkpoint: its merged fp32 weights
    trained = TrainedRun.open(tmp_path / "runs/b2_sgd_agvm_s0")
    model = variance_by_batch.checkpoint_model(trained, trained.config)
    saved, state = consolidated_state_dict(trained.checkpoint), model.state_dict()
    assert trained.checkpoint.tag == "iter_00000001" and set(saved) <= set(state)
    assert all(torch.equal(state[k], saved[k].to(state[k].dtype)) for k in saved)

    again = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 2 and "agvm_ds.commands.train" not in again.stdout
    assert _rows(tmp_path / "runs.csv") == runs
