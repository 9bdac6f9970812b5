"""ds_configs/*.json: what each file promises by its name, and that DeepSpeed 0.19.8 accepts it.

The trainer adds the batch keys (train_micro_batch_size_per_gpu, gradient_accumulation_steps) from
the experiment config and wraps a client optimizer with AGVM, so the files carry neither.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
NAME = re.compile(r"^zero(?P<stage>[0-3])_(?P<precision>fp32|bf16|fp16)(?:_[a-z0-9]+)?$")

EXPECTED_NAMES = {
    "zero0_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16", "zero3_bf16",
    "zero1_fp16", "zero2_fp16", "zero3_fp16", "zero2_fp32", "zero2_bf16_swin1b",
}
# DeepSpeedConfig ignores unknown top-level keys, so a misspelt key would be a silent no-op.
KNOWN_TOP_LEVEL_KEYS = {
    "zero_optimization", "bf16", "fp16", "data_types", "communication_data_type", "gradient_clipping",
    "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown", "csv_monitor", "tensorboard",
}
LEFT_TO_THE_TRAINER = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "optimizer", "scheduler"}


def load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stage_and_precision(path: Path) -> tuple[int, str]:
    match = NAME.match(path.stem)
    assert match, f"{path.name}: name must be zero<stage>_<fp32|bf16|fp16>[_suffix].json"
    return int(match["stage"]), match["precision"]


def precision_of(config: dict[str, Any]) -> str:
    bf16 = config.get("bf16", {}).get("enabled", False)
    fp16 = config.get("fp16", {}).get("enabled", False)
    assert not (bf16 and fp16), "bf16 and fp16 both enabled"
    return "bf16" if bf16 else "fp16" if fp16 else "fp32"


def with_batch_keys(config: dict[str, Any], micro_batch: int = 2, gas: int = 4) -> dict[str, Any]:
    return {**config, "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas}


def test_the_config_set_is_the_documented_one() -> None:
    assert {p.stem for p in CONFIGS} == EXPECTED_NAMES


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_stage_and_precision_match_the_file_name(path: Path) -> None:
    config = load(path)
    stage, precision = stage_and_precision(path)
    assert config["zero_optimization"]["stage"] == stage
    assert precision_of(config) == precision


def test_no_config_uses_fp16_at_stage_0() -> None:
    # DeepSpeed 0.19.8 scales the loss only for ZeRO optimizers, yet FP16_UnfusedOptimizer divides
    # by the loss scale: fp16 at stage 0 with a client optimizer gets gradients off by scale**2.
    offenders = [p.name for p in CONFIGS
                 if load(p)["zero_optimization"]["stage"] == 0 and precision_of(load(p)) == "fp16"]
    assert offenders == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_batch_keys_and_optimizer_are_left_to_the_trainer(path: Path) -> None:
    assert LEFT_TO_THE_TRAINER.isdisjoint(load(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_top_level_keys_are_known_to_deepspeed(path: Path) -> None:
    assert set(load(path)) <= KNOWN_TOP_LEVEL_KEYS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_clipping_monitors_and_quiet_logging(path: Path) -> None:
    config = load(path)
    assert config["gradient_clipping"] > 0
    assert config["zero_allow_untested_optimizer"] is True  # AGVM wraps the client optimizer
    assert config["steps_per_print"] >= 10**6
    for monitor in ("csv_monitor", "tensorboard"):
        assert config[monitor] == {"enabled": True, "output_path": config[monitor]["output_path"],
                                   "job_name": path.stem}
        assert config[monitor]["output_path"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_config_parser_accepts_it_once_batch_keys_are_added(path: Path) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig, DtypeEnum

    # No process group needed: without one DeepSpeedConfig takes rank 0 and world size 1.
    assert not dist.is_initialized()
    config = load(path)
    stage, precision = stage_and_precision(path)

    parsed = DeepSpeedConfig(with_batch_keys(config, micro_batch=2, gas=4))

    assert parsed.world_size == 1
    assert parsed.train_batch_size == 8
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.gradient_clipping == config["gradient_clipping"]
    assert parsed.zero_allow_untested_optimizer is True
    assert parsed.monitor_config.csv_monitor.enabled and parsed.monitor_config.tensorboard.enabled
    for key, value in config["zero_optimization"].items():
        assert getattr(parsed.zero_config, key) == value
    # The parser keeps data_types.grad_accum_dtype as a string; the engine converts it later.
    if parsed.grad_accum_dtype is not None:
        DtypeEnum(parsed.grad_accum_dtype)


def test_swin1b_config_accumulates_bf16_gradients_in_fp32_with_zero2_overlap() -> None:
    config = load(CONFIG_DIR / "zero2_bf16_swin1b.json")
    zero = config["zero_optimization"]
    assert (zero["stage"], precision_of(config)) == (2, "bf16")
    assert config["data_types"]["grad_accum_dtype"] == "fp32"
    assert zero["overlap_comm"] and zero["contiguous_gradients"]
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        # counted in elements; DeepSpeed asserts 16-bit buckets are a multiple of 2
        assert isinstance(zero[key], int) and zero[key] % 2 == 0 and 10**7 <= zero[key] <= 10**9


# --- every config through deepspeed.initialize with AGVM, on 2 CPU ranks ------------------------

EXPECTED_ENGINE_OPTIMIZER = {0: "FP16_UnfusedOptimizer", 1: "DeepSpeedZeroOptimizer",
                             2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def _train_every_config(rank: int, world_size: int, paths: list[str], out_dir: str) -> dict[str, Any]:
    import torch
    from deepspeed.accelerator import get_accelerator

    import agvm_scenarios as scenarios
    from agvm_ds import AGVM, AGVMConfig, module_param_groups
    from agvm_ds.agvm import initialize

    fp16_supported = get_accelerator().is_fp16_supported
    results = {}
    for path in paths:
        config = with_batch_keys(load(Path(path)), micro_batch=scenarios.MICRO_BATCH, gas=2)
        for monitor in ("csv_monitor", "tensorboard"):
            config[monitor]["output_path"] = out_dir
        if config["fp16"].get("enabled"):
            scenarios.allow_cpu_fp16()
        else:
            get_accelerator().is_fp16_supported = fp16_supported
        torch.manual_seed(0)
        model = scenarios.ToyDetector()
        optimizer = AGVM(torch.optim.AdamW(module_param_groups(model, scenarios.MODULES, weight_decay=1e-4), lr=3e-3),
                         AGVMConfig(interval=2, ema=0.5, start_iter=0))
        engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=config)
        dtype = next(engine.module.parameters()).dtype
        losses = []
        for step in range(6):
            for micro in range(2):
                x, y = scenarios.micro_batch(0, rank, micro)  # the same batch every step: loss must fall
                loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
        results[Path(path).stem] = {"optimizer": type(engine.optimizer).__name__, "steps": engine.global_steps,
                                    "first_loss": losses[0], "last_loss": losses[-1]}
    return results


@pytest.mark.slow
def test_every_config_trains_the_toy_detector_with_agvm_on_two_cpu_ranks(tmp_path: Path) -> None:
    from distributed import run_ranks

    results = run_ranks(_train_every_config, 2, [str(p) for p in CONFIGS], str(tmp_path))[0]

    for path in CONFIGS:
        stage, precision = stage_and_precision(path)
        result = results[path.stem]
        expected = "AGVM" if (stage, precision) == (0, "fp32") else EXPECTED_ENGINE_OPTIMIZER[stage]
        assert result["optimizer"] == expected, path.stem
        assert result["steps"] == 6, path.stem
        assert result["last_loss"] < 0.9 * result["first_loss"], (path.stem, result)
        # DeepSpeed's own monitor wrote the lr trace into <output_path>/<job_name>/
        assert (tmp_path / path.stem / "Train_Samples_lr.csv").is_file(), path.stem
