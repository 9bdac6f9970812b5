"""Semantic and panoptic segmentation through the whole system: agvm-train on 2 ZeRO-2 CPU ranks, then
agvm-eval, agvm-export and agvm-predict in one process, and an exact resume."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_jobs import agvm_train, finish, tiny_overrides
from PIL import Image

from agvm_ds.commands import evaluate, export, predict
from agvm_ds.detection.weights import load_detector
from agvm_ds.engine.run_log import read_records

pytestmark = pytest.mark.slow

CONFIGS = {"semantic": "configs/synthetic_semseg_tiny.yaml", "panoptic": "configs/synthetic_panoptic_tiny.yaml"}
METRIC = {"semantic": ("sem_seg", "mIoU"), "panoptic": ("panoptic", "PQ")}


def train(task: str, run: Path, data: Path, *extra: str) -> str:
    return finish(agvm_train(["--config", CONFIGS[task], *tiny_overrides(run, data, *extra)], ranks=2))


#: 4 steps with a checkpoint at step 2 (for the resume test) and one evaluation, at the end
SHORT_RUN = ("train.max_iters=4", "train.checkpoint_iters=2", "train.eval_interval=100",
             "train.checkpoint_interval=100")


@pytest.fixture(scope="module", params=["semantic", "panoptic"])
def trained(request, tmp_path_factory) -> tuple[str, Path]:
    """Four optimizer steps of the task's tiny model on 2 ranks under ZeRO-2, evaluated at the end."""
    root = tmp_path_factory.mktemp(request.param)
    train(request.param, root / "run", root / "data", *SHORT_RUN)
    return request.param, root / "run"


def val_images(task: str, run: Path) -> Path:
    return run.parent / "data" / task / "images" / "val"


def test_the_run_logged_its_tasks_metric_and_plotted_it(trained):
    task, run = trained
    kind, metric = METRIC[task]
    record = read_records(run / "eval_log.jsonl")[-1]
    assert record["iteration"] == 4 and 0 <= record[kind][metric] <= 1
    assert (run / "map.png").is_file() and (run / "eval" / "metrics.json").is_file()


def test_eval_in_one_process_equals_the_two_rank_runs_own_evaluation(trained, tmp_path):
    """Semantic: equal (integer pixel counts). Panoptic: equal to float64 rounding, as the run summed each
    rank's IoU sums and then added the two ranks', where one process adds them in one sequence."""
    task, run = trained
    assert evaluate.main([str(run), "--out", str(tmp_path)]) == 0
    ours, logged = (json.loads((path / "metrics.json").read_text()) for path in (tmp_path, run / "eval"))
    kind, metric = METRIC[task]
    assert ours[kind].keys() == logged[kind].keys() and logged[kind][metric] > 0
    for name, value in logged[kind].items():
        assert ours[kind][name] == pytest.approx(value, rel=1e-12, nan_ok=True), name


def test_exported_file_predicts_as_the_run_directory_does(trained, tmp_path):
    task, run = trained
    model_file = export.export(run, tmp_path / "model.safetensors")
    exported = load_detector(model_file)
    assert [c["name"] for c in exported.categories] == [c["name"] for c in predict.load_model(run).categories]
    image = sorted(val_images(task, run).iterdir())[0]
    with torch.no_grad():
        ours = predict.predict_image(exported, image, 0.5)[1]
        theirs = predict.predict_image(predict.load_model(run), image, 0.5)[1]
    key = "sem_seg" if task == "semantic" else "panoptic_seg"
    assert torch.equal(ours[key], theirs[key])


def test_predict_writes_a_colour_png_and_a_json_per_image(trained, tmp_path):
    task, run = trained
    images = val_images(task, run)
    assert predict.main([str(run), str(images), "--out", str(tmp_path)]) == 0
    categories = {c["name"] for c in predict.load_model(run).categories}
    for path in sorted(images.iterdir()):
        picture = np.array(Image.open(tmp_path / f"{path.stem}.png"))
        assert picture.shape[:2] == np.array(Image.open(path)).shape[:2] and picture.shape[2] == 3
        result = json.loads((tmp_path / f"{path.stem}.json").read_text())
        if task == "semantic":
            assert result["classes"] and {c["name"] for c in result["classes"]} <= categories
            assert sum(c["pixels"] for c in result["classes"]) == picture.shape[0] * picture.shape[1]
        else:
            segments = result["segments_info"]
            assert all(s["category_name"] in categories and s["area"] > 0 for s in segments)
            assert len({s["id"] for s in segments}) == len(segments)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(trained, tmp_path):
    """A copy of the run cut back to its step-2 checkpoint, continued with --resume auto to step 4: the same
    losses and the same metric as the uninterrupted run."""
    task, run = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    checkpoints = resumed / "checkpoints"
    shutil.rmtree(checkpoints / "iter_00000004")
    (checkpoints / "latest").write_text("iter_00000002")
    output = finish(agvm_train(["--config", CONFIGS[task], "--resume", "auto",
                                *tiny_overrides(resumed, run.parent / "data", *SHORT_RUN)], ranks=2))
    assert "resumed from" in output and "at iteration 2" in output
    losses = [[r["loss"] for r in read_records(path / "train_log.jsonl")] for path in (run, resumed)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    kind, metric = METRIC[task]
    final = [read_records(path / "eval_log.jsonl")[-1][kind][metric] for path in (run, resumed)]
    assert final[0] == final[1]


@pytest.mark.parametrize("task, floor", [("semantic", 0.25), ("panoptic", 0.15)])
def test_a_short_training_learns_far_above_the_untrained_model(task, floor, tmp_path):
    """One epoch of the task's tiny job on 2 ranks (about two minutes) against its own untrained start."""
    run = tmp_path / "run"
    args = ["--config", CONFIGS[task], f"output_dir={run}", f"data.root={tmp_path / 'data'}",
            "data.synthetic_train=320", "data.synthetic_val=40", "train.epochs=1", "train.eval_at_start=true"]
    output = finish(agvm_train(args, ranks=2), timeout=1200)
    kind, metric = METRIC[task]
    evals = read_records(run / "eval_log.jsonl")
    untrained, trained = evals[0][kind][metric], evals[-1][kind][metric]
    assert evals[0]["iteration"] == 0 and evals[-1]["iteration"] > 0
    assert trained > max(floor, 3 * untrained), (evals, output[-2000:])


@pytest.mark.parametrize("task", ["semantic", "panoptic"])
def test_zero3_bf16_autocast_with_activation_checkpointing_trains_and_evaluates(task, tmp_path):
    """The segmenters under the 1B configuration's settings: parameters partitioned across the ranks (every
    forward gathers them), bf16 autocast, activation checkpointing of the backbone. One validation image for two
    ranks: rank 1 runs its forwards on rank 0's image (ZeRO-3's lockstep) and must not count it."""
    run = tmp_path / "run"
    output = train(task, run, tmp_path / "data", "deepspeed=zero3_bf16", "model_overrides.checkpointing=true",
                   "train.max_iters=1", "data.synthetic_val=1")
    assert "ZeRO stage 3, autocast torch.bfloat16" in output
    records = read_records(run / "train_log.jsonl")
    assert len(records) == 1 and all(math.isfinite(r["loss"]) for r in records)
    kind, metric = METRIC[task]
    assert 0 <= read_records(run / "eval_log.jsonl")[-1][kind][metric] <= 1
    if task == "semantic":  # the labelled pixels the run counted are those of the one image, counted once
        assert evaluate.main([str(run), "--out", str(tmp_path / "eval")]) == 0
        counted, once = ([c["target_pixels"] for c in json.loads((path / "semantic_per_class.json").read_text())
                          ["classes"]] for path in (run / "eval", tmp_path / "eval"))
        assert sum(once) > 0 and counted == once
