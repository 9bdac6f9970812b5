"""After training: agvm-eval, agvm-predict and agvm-export on a checkpoint written by 2 ZeRO-2 CPU ranks,
read back in one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_jobs import agvm_train, finish, tiny_overrides
from PIL import Image

from agvm_ds.commands import evaluate, export, predict
from agvm_ds.data.synthetic import CATEGORIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two optimizer steps of the tiny Faster R-CNN on 2 ranks under ZeRO-2, evaluated at the end."""
    root = tmp_path_factory.mktemp("trained")
    finish(agvm_train(["--config", "configs/synthetic_tiny.yaml",
                       *tiny_overrides(root / "run", root / "data", "train.max_iters=2")], ranks=2))
    return root / "run"


def test_eval_in_one_process_equals_the_two_rank_runs_own_evaluation(run, tmp_path):
    assert evaluate.main([str(run), "--out", str(tmp_path)]) == 0
    logged = json.loads((run / "eval" / "metrics.json").read_text())
    assert json.loads((tmp_path / "metrics.json").read_text()) == logged
    assert logged["bbox"]["AR100"] > 0  # the comparison is not between two empty evaluations


def test_eval_of_a_zero3_checkpoint_in_one_process_equals_the_runs_own(tmp_path):
    """ZeRO-3 keeps no whole parameter anywhere: the weights come only from merging the 2 ranks' partitions."""
    run = tmp_path / "run"
    finish(agvm_train(["--config", "configs/synthetic_tiny.yaml", "deepspeed=zero3_bf16",
                       "deepspeed_overrides.torch_autocast.enabled=false",
                       *tiny_overrides(run, tmp_path / "data", "train.max_iters=1")], ranks=2))
    assert evaluate.main([str(run), "--out", str(tmp_path / "eval")]) == 0
    logged = json.loads((run / "eval" / "metrics.json").read_text())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == logged


def test_eval_refuses_a_set_with_other_categories(run, tmp_path, capsys):
    val = run.parent / "data" / "annotations" / "instances_val.json"
    other = json.loads(val.read_text())
    other["categories"] = [{"id": 2, "name": "hexagon"}]
    other["annotations"] = []
    (tmp_path / "other.json").write_text(json.dumps(other))
    images = run.parent / "data" / "images" / "val"
    code = evaluate.main([str(run), "--ann", str(tmp_path / "other.json"), "--images", str(images)])
    assert code == 2
    assert "category ids [2], but the model was trained on [1, 3, 5, 7]" in capsys.readouterr().err


def test_exported_file_holds_weights_batchnorm_statistics_spec_and_classes(run, tmp_path):
    out = tmp_path / "model.safetensors"
    assert export.main([str(run), "--out", str(out)]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        header = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert header["categories"] == [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    assert header["spec"]["num_classes"] == 5 and header["spec"]["min_size"] == 128  # data.test_size
    assert header["world_size"] == 2 and header["zero_stage"] == 2
    engine_state = torch.load(run / "checkpoints" / "iter_00000002" / "mp_rank_00_model_states.pt",
                              weights_only=False)["module"]
    assert set(tensors) == set(engine_state)
    statistics = [name for name in engine_state if name.endswith("running_var")]
    assert statistics and all(torch.equal(tensors[n], engine_state[n]) for n in statistics)
    assert all(torch.equal(tensors[n], engine_state[n]) for n in engine_state)  # fp32 run: master == module


def test_predictions_of_the_exported_file_equal_the_runs_own_without_deepspeed(run, tmp_path):
    """agvm-predict on the exported file, in a process where DeepSpeed cannot be imported, gives the
    detections the 2-rank engine gave in its final evaluation. Compared on the square images: every
    synthetic image fits in them, so an evaluation batch pads them to nothing (padding changes detections)."""
    model = tmp_path / "model.safetensors"
    export.export(run, model)
    val_images = run.parent / "data" / "images" / "val"
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    blocker = "import sys; sys.modules['deepspeed'] = None; from agvm_ds.commands.predict import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", blocker, str(model), str(val_images), str(tmp_path / "broken.jpg"),
                             "--out", str(tmp_path / "out"), "--score-threshold", "0"],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]  # one image skipped
    assert f"skipped {tmp_path / 'broken.jpg'}: cannot read image" in result.stderr
    assert "8 of 9 image(s) written" in result.stdout

    engine = defaultdict(list)
    for detection in json.loads((run / "eval" / "results_bbox.json").read_text()):
        engine[detection["image_id"]].append(detection)
    square = [p for p in sorted(val_images.iterdir()) if Image.open(p).size == (128, 128)]
    assert square
    for path in square:
        exported = json.loads((tmp_path / "out" / f"{path.stem}.json").read_text())
        assert (tmp_path / "out" / f"{path.stem}.png").stat().st_size > 1000
        assert {d["category_name"] for d in exported} <= {c["name"] for c in CATEGORIES}
        image_id = int(path.stem)
        assert len(exported) == len(engine[image_id]) > 0
        by_score = sorted(exported, key=lambda d: -d["score"]), sorted(engine[image_id], key=lambda d: -d["score"])
        for ours, theirs in zip(*by_score):
            assert ours["image_id"] == image_id and ours["category_id"] == theirs["category_id"]
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)
            assert ours["bbox"] == pytest.approx(theirs["bbox"], abs=1e-3)


def test_predict_from_the_run_directory_keeps_detections_above_the_threshold_and_draws_them(run, tmp_path):
    images = run.parent / "data" / "images" / "val"
    assert predict.main([str(run), str(images), "--out", str(tmp_path), "--score-threshold", "0.19"]) == 0
    kept = {p.stem: json.loads((tmp_path / f"{p.stem}.json").read_text()) for p in images.iterdir()}
    scores = [d["score"] for detections in kept.values() for d in detections]
    assert scores and min(scores) >= 0.19 and len(scores) < 8 * 50  # 2 steps in: scores up to ~0.2
    stem = next(stem for stem, detections in kept.items() if detections)
    drawn = torch.from_numpy(np.array(Image.open(tmp_path / f"{stem}.png").convert("RGB")))
    original = torch.from_numpy(np.array(Image.open(images / f"{stem}.jpg").convert("RGB")))
    assert drawn.shape == original.shape and (drawn != original).any()


def test_console_scripts_are_installed():
    for command in ("agvm-eval", "agvm-predict", "agvm-export"):
        result = subprocess.run([command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and command in result.stdout
