"""Experiment configs, overrides, the learning-rate schedule and the plot command (no training)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from agvm_ds.commands.plot import main as plot_main
from agvm_ds.commands.train import main as train_main
from agvm_ds.engine import load_config, lr_multiplier, peak_lr
from agvm_ds.engine.config import OptimizerConfig, ScheduleConfig


def coco_paths(root: Path) -> list[str]:
    """Overrides pointing the four data.* paths of a COCO config at existing (empty) files and folders."""
    (root / "images").mkdir(exist_ok=True)
    (root / "ann.json").write_text("{}")
    return [f"data.train_images={root / 'images'}", f"data.train_ann={root / 'ann.json'}",
            f"data.val_images={root / 'images'}", f"data.val_ann={root / 'ann.json'}"]


def test_every_shipped_experiment_config_loads(tmp_path):
    configs = sorted(Path("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        text = path.read_text()
        overrides = coco_paths(tmp_path) if "dataset: coco" in text else []
        overrides += [f"data.root={tmp_path}"] if "dataset: ade20k" in text else []
        config = load_config(path, overrides)
        assert Path(config.deepspeed).is_file(), path


def test_overrides_reach_nested_sections_with_yaml_types():
    config = load_config("configs/synthetic_tiny.yaml", ["agvm.enabled=false", "optimizer.lr=0.1",
                                                         "data.scales=[128,160]",
                                                         "deepspeed_overrides.zero_optimization.stage=3"])
    assert config.agvm.enabled is False and config.optimizer.lr == 0.1 and config.data.scales == (128, 160)
    assert config.deepspeed_overrides == {"zero_optimization": {"stage": 3}}


def test_unknown_key_names_the_file_and_lists_valid_keys(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optimizer:\n  lrr: 0.1\n")
    with pytest.raises(ValueError,
                       match=r"exp.yaml: optimizer: unknown key\(s\) \['optimizer.lrr'\]; valid keys are .*'lr'"):
        load_config(path)


def test_unknown_agvm_key_lists_agvm_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['agvm.intreval'\].*'interval'"):
        load_config(None, ["agvm.intreval=5"])


@pytest.mark.parametrize("override, message", [
    ("optimizer.name=adam", "optimizer.name='adam': expected one of ['sgd', 'adamw', 'lamb', 'lars']"),
    ("train.epochs=zero", "train.epochs='zero': expected int"),
    ("agvm.ema=1.5", "ema=1.5 is invalid"),
    ("data.dataset=coco", "data.dataset=coco needs data.train_images"),
    ("data.dataset=semantic_folder", "data.dataset=semantic_folder needs data.train_images, data.train_masks, "
                                     "data.val_images, data.val_masks, data.classes"),
    ("data.resize_ratio=[2.0,0.5]", "data.resize_ratio=[2.0, 0.5]: expected [low, high] with low <= high"),
    ("schedule.milestones=[0.5,1.5]", "fractions of the run in (0, 1)"),
    ("data.test_size=0", "data.test_size=0: expected an integer >= 1"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips=0: expected an integer >= 1"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s=0.0: expected a finite number > 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1: expected an integer >= 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0: expected an integer >= 1"),
    ("train.log_interval=0", "train.log_interval=0: expected an integer >= 1"),
    ("train.eval_interval=0", "train.eval_interval=0: expected an integer >= 1"),
    ("train.checkpoint_interval=0", "train.checkpoint_interval=0: expected an integer >= 1"),
    ("train.checkpoint_iters=0", "train.checkpoint_iters=0: expected an integer >= 1"),
    ("train.max_iters=-5", "train.max_iters=-5: expected an integer >= 1"),
    ("optimizer.lr=.nan", "optimizer.lr=nan: expected a finite number"),
    ("optimizer.lr=.inf", "optimizer.lr=inf: expected a finite number"),
    ("optimizer.lr=0", "optimizer.lr=0.0: expected a finite number > 0"),
    ("optimizer.eps=-1e-8", "optimizer.eps=-1e-08: expected a finite number > 0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1: expected a finite number >= 0"),
    ("optimizer.momentum=1.0", "optimizer.momentum=1.0: expected a finite number in [0, 1)"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9]: expected exactly 2 numbers in [0, 1)"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=1.0: expected a finite number in [0, 1)"),
    ("schedule.gamma=0", "schedule.gamma=0.0: expected a finite number in (0, 1]"),
    ("schedule.warmup_ratio=1.5", "schedule.warmup_ratio=1.5: expected a finite number in (0, 1]"),
    ("schedule.warmup_iters=-1", "schedule.warmup_iters=-1: expected an integer >= 0"),
    ("agvm.clamp_max=.inf", "agvm.clamp_max=inf: expected a finite number"),
    ("data.num_workers=-1", "data.num_workers=-1: expected an integer >= 0"),
    ("data.scales=[]", "data.scales=(): expected a non-empty list"),
    ("data.scales=[640,0]", "data.scales=0: expected an integer >= 1"),
    ("data.max_size=0", "data.max_size=0: expected an integer >= 1"),
    ("data.lsj_size=-1", "data.lsj_size=-1: expected an integer >= 1"),
    ("data.synthetic_size=0", "data.synthetic_size=0: expected an integer >= 1"),
    ("data.recipe=mosaic", "data.recipe='mosaic': expected one of ['none', 'hflip', 'multiscale', 'lsj', 'semseg']"),
])
def test_bad_values_are_refused_naming_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ValueError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_cli_reports_bad_config_and_exits_2(capsys):
    assert train_main(["--config", "configs/synthetic_tiny.yaml", "train.epochz=3"]) == 2
    assert "train.epochz" in capsys.readouterr().err
    assert train_main(["--config", "missing.yaml"]) == 2
    assert "experiment config 'missing.yaml': no such file" in capsys.readouterr().err


def test_cli_prints_resolved_config(capsys):
    assert train_main(["--config", "configs/synthetic_tiny.yaml", "--print-config", "seed=7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["experiment"]["seed"] == 7 and printed["experiment"]["agvm"]["interval"] == 5
    assert printed["model_spec"]["min_size"] == 192 and printed["model_spec"]["max_size"] == 208  # evaluation size
    assert printed["deepspeed"]["train_micro_batch_size_per_gpu"] == 4


def test_lr_scales_with_global_batch():
    assert peak_lr(OptimizerConfig(lr=0.02, base_batch_size=16), 256) == pytest.approx(0.32)
    assert peak_lr(OptimizerConfig(lr=0.02, base_batch_size=16, lr_scaling="sqrt"), 256) == pytest.approx(0.08)


def test_warmup_then_step_decay():
    f = lr_multiplier(ScheduleConfig(warmup="linear", warmup_iters=10, warmup_ratio=0.001, milestones=(0.5, 0.75)), 100)
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.001 + 0.999 * 0.5) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(75) == pytest.approx(0.01)


def test_exponential_warmup_matches_the_official_recipe():
    f = lr_multiplier(ScheduleConfig(warmup="exponential", warmup_iters=920, warmup_ratio=0.001, decay="none"), 10000)
    assert f(0) == pytest.approx(0.001) and f(460) == pytest.approx(math.sqrt(0.001)) and f(920) == 1.0


def test_cosine_decay_reaches_the_floor():
    f = lr_multiplier(ScheduleConfig(warmup="none", decay="cosine", min_lr_ratio=0.05), 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.525) and f(100) == pytest.approx(0.05)


def test_poly_decay_is_mmsegs():
    f = lr_multiplier(ScheduleConfig(warmup="none", decay="poly", power=0.9, min_lr_ratio=0.0), 100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5 ** 0.9) and f(100) == 0.0


def test_plot_command_writes_the_figures(tmp_path, capsys):
    def stats(f):
        return {m: {"factor": f, "phi": 0.1 * f, "noise_scale": 2.0} for m in ("backbone", "fpn")}

    with open(tmp_path / "train_log.jsonl", "w") as log:
        for it in (5, 10, 15):
            record = {"iteration": it, "loss": 1.0 / it, "loss_box_reg": 0.5 / it, "agvm": stats(it / 10)}
            log.write(json.dumps(record) + "\n")
    with open(tmp_path / "eval_log.jsonl", "w") as log:
        log.write(json.dumps({"iteration": 15, "bbox": {"AP": 0.2, "AP50": 0.4}}) + "\n")
    assert plot_main([str(tmp_path)]) == 0
    for name in ("agvm_phi.png", "agvm_factor.png", "loss.png", "map.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    assert "agvm_phi.png" in capsys.readouterr().out


@pytest.mark.parametrize("name, base", [("sgd", "SGD"), ("adamw", "AdamW"), ("lamb", "Lamb")])
def test_each_optimizer_is_built_inside_agvm_and_steps(name, base):
    import torch
    from torch import nn

    from agvm_ds import AGVM, AGVMConfig
    from agvm_ds.engine.config import OptimizerConfig
    from agvm_ds.engine.optim import build_optimizer, describe

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    modules = {"backbone": ["0"], "head": ["1"]}
    optimizer = build_optimizer(model, modules, OptimizerConfig(name=name, weight_decay=0.01), 0.1, AGVMConfig())
    assert isinstance(optimizer, AGVM) and type(optimizer.base_optimizer).__name__ == base
    assert describe(optimizer) == {"backbone": 20, "head": 10}
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"backbone": 0.01, "backbone_no_decay": 0.0, "head": 0.01, "head_no_decay": 0.0}
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("overrides, expected", [
    (["data.recipe=multiscale", "data.scales=[480,512,544]", "data.max_size=900"], (544, 900)),
    (["data.recipe=lsj", "data.lsj_size=640"], (640, 640)),
    (["data.recipe=hflip"], None),
    (["data.recipe=none", "data.test_size=400", "data.test_max_size=600"], (400, 600)),
    (["data.recipe=multiscale", "data.scales=[480,512]", "data.max_size=900", "data.test_size=400"], (400, 900)),
    (["data.recipe=lsj", "data.lsj_size=640", "data.test_max_size=800"], (640, 800)),
])
def test_evaluation_size_follows_the_training_recipe_unless_given(overrides, expected):
    assert load_config(None, overrides).data.test_resize() == expected


def test_one_test_size_without_a_resizing_recipe_is_refused():
    with pytest.raises(ValueError, match="recipe 'hflip' does not resize.*give both or neither"):
        load_config(None, ["data.recipe=hflip", "data.test_size=400"])
    with pytest.raises(ValueError, match="expected test_max_size >= test_size"):
        load_config(None, ["data.test_size=900", "data.test_max_size=600"])


def test_new_train_keys_have_their_defaults():
    train = load_config(None).train
    assert train.max_consecutive_skips == 20 and train.dist_timeout_s == 300.0


def test_scientific_notation_is_a_float_in_overrides_and_files(tmp_path):
    assert load_config(None, ["optimizer.lr=1e-3", "optimizer.eps=1E-6"]).optimizer.lr == 0.001
    path = tmp_path / "exp.yaml"
    path.write_text("optimizer:\n  lr: 2e-4\n  weight_decay: 5e-2\n")
    optimizer = load_config(path).optimizer
    assert optimizer.lr == 0.0002 and optimizer.weight_decay == 0.05


def test_malformed_override_is_one_line_naming_it():
    with pytest.raises(ValueError) as error:
        load_config(None, ["train.epochs=[1"])
    message = str(error.value)
    assert message.startswith("override 'train.epochs=[1': the value is not valid YAML") and "\n" not in message


def test_malformed_yaml_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ValueError) as error:
        load_config(path)
    assert str(error.value).startswith(f"experiment config {path}: not valid YAML") and "\n" not in str(error.value)


def test_model_and_model_overrides_are_checked_at_load_time():
    with pytest.raises(ValueError,
                       match=r"unknown model 'faster_rcnn_r18_tiyn': .*; known models are \[.*'faster_rcnn_r18_tiny'"):
        load_config(None, ["model=faster_rcnn_r18_tiyn"])
    with pytest.raises(ValueError, match=r"model_overrides: unknown key\(s\) \['model_overrides.foo'\]; "
                                         r"valid keys are .*'min_size'"):
        load_config(None, ["model_overrides.foo=1"])
    with pytest.raises(ValueError, match=r"min_size=8 is invalid"):
        load_config(None, ["model_overrides.min_size=8"])
    with pytest.raises(ValueError, match=r"detector_kwargs.rpn_nms_treshold is not a knob"):
        load_config(None, ["model_overrides.detector_kwargs.rpn_nms_treshold=0.5"])
    assert load_config(None, ["model_overrides.detector_kwargs.rpn_nms_thresh=0.5"]).model_overrides == {
        "detector_kwargs": {"rpn_nms_thresh": 0.5}}


@pytest.mark.parametrize("key, instead", [
    ("train_micro_batch_size_per_gpu", "data.batch_size_per_rank"),
    ("gradient_accumulation_steps", "train.gradient_accumulation_steps"),
    ("train_batch_size", "data.batch_size_per_rank"),
])
def test_deepspeed_overrides_may_not_set_what_the_trainer_owns(key, instead):
    with pytest.raises(ValueError, match=f"deepspeed_overrides.{key}: the trainer sets it .*set {instead}"):
        load_config(None, [f"deepspeed_overrides.{key}=8"])


def test_deepspeed_file_is_checked_at_load_time_and_the_shipped_ones_listed(tmp_path):
    with pytest.raises(ValueError, match=r"deepspeed='ds_configs/zero9.json': file not found.*zero2_fp32"):
        load_config(None, ["deepspeed=ds_configs/zero9.json"])
    broken = tmp_path / "broken.json"
    broken.write_text("{\"zero_optimization\": ")
    with pytest.raises(ValueError, match=f"deepspeed='{broken}': not a JSON file"):
        load_config(None, [f"deepspeed={broken}"])


def test_a_data_set_must_serve_the_models_task(tmp_path):
    with pytest.raises(ValueError, match=r"data.dataset=ade20k: model 'faster_rcnn_r18_tiny' is a detection model; "
                                         r"data sets for detection: coco, synthetic"):
        load_config(None, ["data.dataset=ade20k", f"data.root={tmp_path}"])
    with pytest.raises(ValueError, match=r"data.recipe=multiscale: semantic models train with recipe semseg"):
        load_config(None, ["model=semantic_fpn_r18_tiny"])
    with pytest.raises(ValueError, match=r"data.recipe=semseg: detection models train with one of none, hflip"):
        load_config(None, ["data.recipe=semseg"])
    with pytest.raises(ValueError, match=r"data.root='.*nowhere': ADE20K folder not found"):
        load_config(None, ["model=upernet_r18_tiny", "data.recipe=semseg", "data.dataset=ade20k",
                           f"data.root={tmp_path / 'nowhere'}"])


def test_coco_data_paths_must_exist_at_load_time(tmp_path):
    paths = coco_paths(tmp_path)
    assert load_config(None, ["data.dataset=coco", *paths]).data.val_ann == str(tmp_path / "ann.json")
    missing = tmp_path / "val.json"
    with pytest.raises(ValueError) as error:
        load_config(None, ["data.dataset=coco", *paths, f"data.val_ann={missing}"])
    assert str(error.value) == f"data.val_ann={str(missing)!r}: annotation file not found"


def test_cli_reports_a_malformed_override_in_one_line(capsys):
    assert train_main(["--config", "configs/synthetic_tiny.yaml", "train.epochs=[1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["agvm-train: override 'train.epochs=[1': the value is not valid YAML "
                                        "(expected ',' or ']', but got '<stream end>' at line 1, column 3)"]


def test_one_override_helper_sets_dotted_keys_and_merges_mappings_recursively():
    from agvm_ds.config_checks import apply_overrides

    base = {"zero_optimization": {"stage": 2, "overlap_comm": False}, "gradient_clipping": 1.0}
    merged = apply_overrides(base, {"zero_optimization": {"stage": 3}, "bf16.enabled": True})

    assert merged == {"zero_optimization": {"stage": 3, "overlap_comm": False}, "gradient_clipping": 1.0,
                      "bf16": {"enabled": True}}
    assert base["zero_optimization"]["stage"] == 2  # a copy
    with pytest.raises(ValueError, match="override 'gradient_clipping.x': gradient_clipping is not a mapping"):
        apply_overrides(base, {"gradient_clipping.x": 1})


def test_deepspeed_overrides_merge_into_the_file_from_the_command_line():
    from agvm_ds.engine.deepspeed_config import deepspeed_config

    ds = deepspeed_config(load_config("configs/synthetic_tiny.yaml", ["deepspeed_overrides.zero_optimization.stage=3"]))
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": False, "contiguous_gradients": True}


def test_model_info_reads_overrides_as_the_experiment_config_does(capsys):
    from agvm_ds.commands.model_info import main as model_info

    assert model_info(["faster_rcnn_r18_tiny", "--meta", "--set", "detector_kwargs.box_nms_thresh=5e-1"]) == 0
    assert model_info(["faster_rcnn_r18_tiny", "--meta", "--set", "detector_kwargs.box_nms_thresh"]) == 2
    assert "is not of the form key.sub=value" in capsys.readouterr().err


def test_configs_models_and_deepspeed_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from agvm_ds.engine.deepspeed_config import deepspeed_config

    monkeypatch.chdir(tmp_path)
    config = load_config("synthetic_tiny", ["deepspeed=zero3_bf16", "model=mask_rcnn_r18_tiny"])
    assert config.optimizer.name == "adamw" and deepspeed_config(config)["zero_optimization"]["stage"] == 3
    # the file's own path form
    assert load_config("configs/synthetic_tiny.yaml").deepspeed == "ds_configs/zero2_fp32.json"
    assert deepspeed_config(load_config("configs/synthetic_tiny.yaml"))["zero_optimization"]["stage"] == 2
    (tmp_path / "mine.yaml").write_text("model: faster_rcnn_r18_tiny\ntrain:\n  epochs: 3\n")
    assert load_config("mine.yaml").train.epochs == 3  # a path is read as given
    with pytest.raises(FileNotFoundError, match=r"experiment config 'synthetic_tyni': no such file .*synthetic_tiny"):
        load_config("synthetic_tyni")


def test_evaluation_size_comes_from_the_recipe_and_a_conflicting_model_size_is_refused():
    from agvm_ds.engine.model_spec import experiment_spec

    config = load_config(None, ["data.scales=[384,400]", "data.max_size=666"])
    spec = experiment_spec(config)
    assert (spec.min_size, spec.max_size) == (400, 666)
    agreeing = load_config(None, ["data.scales=[384,400]", "data.max_size=666", "model_overrides.min_size=400",
                                  "model_overrides.max_size=666"])
    assert experiment_spec(agreeing).min_size == 400
    conflicting = load_config(None, ["data.scales=[384,400]", "data.max_size=666", "model_overrides.min_size=192"])
    with pytest.raises(ValueError,
                       match=r"model_overrides \{'min_size': 192\}.*data.test_size=400 / data.test_max_size=666"):
        experiment_spec(conflicting)


def test_phi_plot_says_how_many_micro_batch_gradients_each_point_used():
    from agvm_ds.engine.plots import _estimate_note

    assert "M = 2 micro-batch gradients" in _estimate_note(2) and "mostly noise" in _estimate_note(2)
    assert "M = 64" in _estimate_note(64) and "noise" not in _estimate_note(64)
    assert _estimate_note(None) == ""


def test_sections_are_pydantic_dataclasses_that_refuse_bools_for_numbers_and_take_ints_for_floats():
    import dataclasses

    from agvm_ds import AGVMConfig
    from agvm_ds.engine.config import DataConfig

    assert OptimizerConfig(lr=1).lr == 1.0 and isinstance(OptimizerConfig(lr=1).lr, float)
    with pytest.raises(ValueError, match=r"^lr=True: expected float \(a finite number > 0\)$"):
        OptimizerConfig(lr=True)
    with pytest.raises(ValueError, match=r"^AGVM config: interval=True: expected int \(an integer >= 1\)$"):
        AGVMConfig(interval=True)
    data = load_config(None, ["data.scales=[128, 160]"]).data
    assert data == DataConfig(scales=(128, 160)) and hash(data) == hash(DataConfig(scales=(128, 160)))
    assert dataclasses.replace(data, max_size=300).max_size == 300
    with pytest.raises(ValueError, match=r"^max_size=0: expected an integer >= 1$"):
        dataclasses.replace(data, max_size=0)


def test_a_rule_of_a_nested_section_names_the_section():
    with pytest.raises(ValueError,
                       match=r"^agvm: stop_iter=3 is invalid: expected None or an integer >= start_iter \(5\)$"):
        load_config(None, ["agvm.start_iter=5", "agvm.stop_iter=3"])
    with pytest.raises(ValueError, match=r"^optimizer=5: expected a mapping$"):
        load_config(None, ["optimizer=5"])
