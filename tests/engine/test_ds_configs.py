"""ds_configs/*.json: what each file promises by its name, and that DeepSpeed 0.19.8 accepts it.

The trainer adds the batch keys (train_micro_batch_size_per_gpu, gradient_accumulation_steps) from
the experiment config and wraps a client optimizer with AGVM, so the files carry neither.

"bf16" in a file name means DeepSpeed's ``torch_autocast`` section with bfloat16 (fp32 weights,
gradients and optimizer states; bf16 activations), never DeepSpeed's ``bf16`` section (bf16 weights),
which torchvision detectors cannot run: see ds_configs/README.md.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "ds_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))
NAME = re.compile(r"^zero(?P<stage>[0-3])_(?P<precision>fp32|bf16|fp16)(?:_[a-z0-9]+)?$")

EXPECTED_NAMES = {
    "zero0_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16", "zero3_bf16",
    "zero1_fp16", "zero2_fp16", "zero3_fp16", "zero2_fp32", "zero2_bf16_swin1b", "zero3_bf16_swin1b",
    "zero3_bf16_offload", "zero3_bf16_infinity",
}
# DeepSpeedConfig ignores unknown top-level keys, so a misspelt key would be a silent no-op.
KNOWN_TOP_LEVEL_KEYS = {
    "zero_optimization", "bf16", "fp16", "torch_autocast", "data_types", "communication_data_type",
    "gradient_clipping", "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown",
    "csv_monitor", "tensorboard", "zero_force_ds_cpu_optimizer", "aio",
}
PRECISION_SECTIONS = ("bf16", "fp16", "torch_autocast")
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
    """fp32, bf16 (torch autocast to bfloat16 over fp32 weights) or fp16 (DeepSpeed's fp16 section).

    DeepSpeed's own ``bf16`` section (bf16 weights) and fp16 autocast (a GradScaler, which AGVM refuses)
    are no precision of ours: they fail here rather than map to a name.
    """
    enabled = [section for section in PRECISION_SECTIONS if config.get(section, {}).get("enabled", False)]
    assert len(enabled) <= 1, f"more than one precision section enabled: {enabled}"
    assert "bf16" not in enabled, 'DeepSpeed\'s "bf16" section (pure bf16 weights) is enabled'
    if enabled == ["torch_autocast"]:
        dtype = config["torch_autocast"].get("dtype")
        assert dtype == "bfloat16", f"torch_autocast dtype {dtype!r}: only bfloat16 is supported with AGVM"
        return "bf16"
    return "fp16" if enabled == ["fp16"] else "fp32"


def _parsed_field(section: Any, key: str) -> Any:
    """A field of a parsed DeepSpeed config section by its JSON key (``stage3_*`` keys are aliases)."""
    name = next((n for n, f in type(section).model_fields.items() if key in (n, f.alias)), key)
    return getattr(section, name)


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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_states_all_three_precision_switches(path: Path) -> None:
    # The precision of a file is read off one flag: zero0_fp32 and zero0_bf16 differ only in torch_autocast.
    config = load(path)
    for section in PRECISION_SECTIONS:
        assert isinstance(config[section]["enabled"], bool), (path.name, section)


def test_no_config_enables_deepspeeds_pure_bf16_section() -> None:
    offenders = [p.name for p in CONFIGS if load(p)["bf16"].get("enabled", False)]
    assert offenders == [], (
        f"{offenders}: DeepSpeed's bf16 section casts parameters to bf16 but not buffers, and torchvision's "
        "nms has no bf16 kernel (\"nms_kernel\" not implemented for 'BFloat16'); torchvision's detection ops "
        "are written for autocast, which casts nms/roi_align inputs to fp32. Use "
        '"torch_autocast": {"enabled": true, "dtype": "bfloat16"} with "bf16": {"enabled": false}.'
    )


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
    import torch
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    # No process group needed: without one DeepSpeedConfig takes rank 0 and world size 1.
    assert not dist.is_initialized()
    config = load(path)
    stage, precision = stage_and_precision(path)

    parsed = DeepSpeedConfig(with_batch_keys(config, micro_batch=2, gas=4))

    assert parsed.world_size == 1
    assert parsed.train_batch_size == 8
    assert parsed.zero_optimization_stage == stage
    # bf16 means torch autocast to bfloat16 over fp32 weights; DeepSpeed's bf16 section stays off.
    assert parsed.bfloat16_config.enabled is False
    assert parsed.torch_autocast_enabled == (precision == "bf16")
    assert parsed.torch_autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
    # Default lower_precision_safe_modules (Linear, Conv1d/2d/3d): the README documents it.
    assert parsed.torch_autocast_lower_precision_safe_modules is None
    assert parsed.float16_config.enabled == (precision == "fp16")
    assert parsed.gradient_clipping == config["gradient_clipping"]
    assert parsed.zero_allow_untested_optimizer is True
    assert parsed.monitor_config.csv_monitor.enabled and parsed.monitor_config.tensorboard.enabled
    for key, value in config["zero_optimization"].items():
        parsed_value = _parsed_field(parsed.zero_config, key)
        for sub_key, sub_value in (value.items() if isinstance(value, dict) else [(None, value)]):
            got = parsed_value if sub_key is None else _parsed_field(parsed_value, sub_key)
            assert (str(getattr(got, "value", got)) if isinstance(sub_value, str) else got) == sub_value, (key, sub_key)
    # No file sets data_types.grad_accum_dtype: gradients accumulate in the weights' dtype, fp32 under autocast.
    assert parsed.grad_accum_dtype is None


def test_swin1b_config_is_zero2_autocast_with_overlapped_bucketed_reduction() -> None:
    config = load(CONFIG_DIR / "zero2_bf16_swin1b.json")
    zero = config["zero_optimization"]
    assert (zero["stage"], precision_of(config)) == (2, "bf16")
    # fp32 weights: gradients are fp32 and ZeRO-2 accumulates them in fp32 without being asked to.
    assert "data_types" not in config
    assert zero["overlap_comm"] and zero["contiguous_gradients"] and zero["reduce_scatter"]
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        # counted in elements; DeepSpeed asserts allgather_bucket_size is a multiple of 2 (nccl alignment)
        assert isinstance(zero[key], int) and zero[key] % 2 == 0 and 10**7 <= zero[key] <= 10**9
    assert config["gradient_clipping"] == 1.0


# --- every config through deepspeed.initialize with AGVM, on 2 CPU ranks ------------------------

# The engine optimizer depends on the stage only: autocast keeps fp32 weights, so a bf16 file gets what an
# fp32 file gets (at stage 0 the client AGVM optimizer itself), and fp16 exists at stages 1-3 only.
EXPECTED_ENGINE_OPTIMIZER = {0: "AGVM", 1: "DeepSpeedZeroOptimizer",
                             2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
# (weights, forward output, gradient communication dtype of the toy's Linear params) per precision
EXPECTED_DTYPES = {"fp32": ("torch.float32", "torch.float32", "torch.float32"),
                   "bf16": ("torch.float32", "torch.bfloat16", "torch.bfloat16"),
                   "fp16": ("torch.float16", "torch.float16", "torch.float16")}


def _train_every_config(rank: int, world_size: int, paths: list[str], out_dir: str) -> dict[str, Any]:
    import agvm_scenarios as scenarios
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    from agvm_ds import AGVM, AGVMConfig, module_param_groups
    from agvm_ds.agvm import initialize

    fp16_supported = get_accelerator().is_fp16_supported
    results = {}
    for path in paths:
        config = with_batch_keys(load(Path(path)), micro_batch=scenarios.MICRO_BATCH, gas=2)
        for monitor in ("csv_monitor", "tensorboard"):
            config[monitor]["output_path"] = out_dir
        for offload in ("offload_optimizer", "offload_param"):  # ZeRO-Infinity swaps into files here
            if config["zero_optimization"].get(offload, {}).get("device") == "nvme":
                config["zero_optimization"][offload]["nvme_path"] = str(Path(out_dir) / "nvme")
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
        losses, output_dtypes = [], set()
        for _ in range(6):
            for micro in range(2):
                x, y = scenarios.micro_batch(0, rank, micro)  # the same batch every step: loss must fall
                output = engine(x.to(dtype))
                output_dtypes.add(str(output.dtype))
                loss = torch.nn.functional.mse_loss(output.float(), y)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
        # With autocast DeepSpeed marks Linear/Conv params to communicate their gradients in bf16;
        # unmarked params report their own dtype.
        comm_dtypes = {str(get_comm_dtype(p)) for p in engine.module.parameters()}
        results[Path(path).stem] = {"optimizer": type(engine.optimizer).__name__, "steps": engine.global_steps,
                                    "first_loss": losses[0], "last_loss": losses[-1],
                                    "dtypes": (str(dtype), *output_dtypes, *comm_dtypes)}
    return results


@pytest.mark.slow
def test_every_config_trains_the_toy_detector_with_agvm_on_two_cpu_ranks(tmp_path: Path) -> None:
    from distributed import run_ranks

    results = run_ranks(_train_every_config, 2, [str(p) for p in CONFIGS], str(tmp_path))[0]

    for path in CONFIGS:
        stage, precision = stage_and_precision(path)
        result = results[path.stem]
        assert result["optimizer"] == EXPECTED_ENGINE_OPTIMIZER[stage], path.stem
        assert result["dtypes"] == EXPECTED_DTYPES[precision], (path.stem, result["dtypes"])
        assert result["steps"] == 6, path.stem
        assert result["last_loss"] < 0.9 * result["first_loss"], (path.stem, result)
        # DeepSpeed's own monitor wrote the lr trace into <output_path>/<job_name>/
        assert (tmp_path / path.stem / "Train_Samples_lr.csv").is_file(), path.stem
