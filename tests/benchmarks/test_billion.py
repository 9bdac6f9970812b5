"""The billion-parameter path: the SwinV2 detector family under ZeRO-3 through the real commands
(benchmarks/billion.py on a small model of the 1B's structure), and the pieces it rests on: a memory-
bounded AGVM preconditioner, the memory records that name an out-of-memory kill, bf16 export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agvm_ds.agvm import optimizer as agvm_optimizer
from agvm_ds.engine.rank_memory import RankMemory, describe_death, read_record

REPO = Path(__file__).resolve().parents[2]


def test_preconditioned_norm_in_chunks_equals_the_whole(monkeypatch):
    torch.manual_seed(0)
    grad, v = torch.randn(10_001), torch.rand(10_001) * 1e-4
    whole = torch.linalg.vector_norm(grad / (v.sqrt() + 1e-8)).square()
    monkeypatch.setattr(agvm_optimizer, "PRECONDITION_CHUNK", 1000)
    chunked = agvm_optimizer.preconditioned_sq_norm(grad, v, 1e-8)
    assert torch.allclose(chunked, whole, rtol=1e-6)
    assert agvm_optimizer.preconditioned_sq_norm(grad[:0], v[:0], 1e-8) == 0


def test_memory_record_names_a_silent_death_as_sigkill_with_its_memory(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", (
        "import time, sys; from agvm_ds.engine.rank_memory import RankMemory; "
        "m = RankMemory(sys.argv[1], 1, lambda: 7, interval=0.1); x = bytearray(300_000_000); time.sleep(60)"),
        str(tmp_path)])
    deadline = time.time() + 60
    while (read_record(tmp_path, 1) or {}).get("rss_bytes", 0) < 300e6:
        assert time.time() < deadline and child.poll() is None
        time.sleep(0.1)
    child.kill()  # SIGKILL, as the out-of-memory killer sends
    child.wait()
    line = describe_death(read_record(tmp_path, 1), 1)
    assert "SIGKILL (signal 9)" in line and "out-of-memory killer" in line and "at iteration 7" in line
    assert float(line.split("last measured memory: ")[1].split(" GB")[0]) >= 0.3


def test_memory_record_of_a_rank_that_raised_says_its_error(tmp_path):
    memory = RankMemory(tmp_path, 0, lambda: 3, interval=60)
    memory.close("ValueError: bad input")
    record = read_record(tmp_path, 0)
    assert record["status"] == "ValueError: bad input"
    assert record["peak_rss_bytes"] > 0 and record["start_rss_bytes"] > 0
    assert describe_death(record, 0) == "rank 0 reported: ValueError: bad input"
    assert describe_death(None, 0) == ""


@pytest.mark.slow
def test_swinv2_detector_under_zero3_steps_resumes_exactly_and_exports(tmp_path):
    """benchmarks/billion.py end to end on a small SwinV2 of the 1B's structure (window 16, deep third
    stage): ZeRO-3, checkpointing, preconditioned AGVM; kill -9 + resume bitwise equal; a 1-rank resume
    through the universal checkpoint; agvm-eval; fp32 and bf16 export; agvm-predict; the profiled step."""
    out = tmp_path / "billion"
    result = subprocess.run([sys.executable, "benchmarks/billion.py", "--small", "--out", str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "billion.json").read_text())

    straight = results["straight"]
    assert "ZeRO stage 3, torch.float32" in straight["banner"]  # fp32 on CPU: see configs/synthetic_swinv2_1b.yaml
    assert len(straight["step_s"]) == 6 and len(straight["peak_rss_gb"]) == 2
    assert all(peak > 0.9 * start > 0 for peak, start in zip(straight["peak_rss_gb"], straight["start_rss_gb"]))
    measured = [factors for factors in straight["agvm_factors"].values() if any(f != 1.0 for f in factors.values())]
    assert len(measured) >= 2  # AGVM statistics every 2 steps moved some factor
    assert straight["checkpoint_gb"] > 0 and straight["save_s"] > 0

    killed = results["killed"]
    assert killed["tensors"] > 100 and killed["differing"] == [] and killed["same_metrics"]
    assert killed["bitwise_equal"] and killed["load_s"] > 0

    one_rank = results["one_rank"]
    assert one_rank["iterations"] == [4] and one_rank["universal_gb"] > 0 and len(one_rank["peak_rss_gb"]) == 1

    assert 0.0 <= results["evaluate"]["bbox_AP"] <= 1.0
    export = results["export"]
    assert 0.45 < export["bf16"]["gb"] / export["fp32"]["gb"] < 0.55
    assert (out / "predictions" / f"{Path(export['predict']['image']).stem}.png").is_file()

    profile = results["profile"]
    for region in ("forward", "backward", "optimizer_step", "agvm_statistics", "zero_collectives"):
        assert profile[region] > 0, (region, profile)
    assert profile["forward"] + profile["backward"] + profile["optimizer_step"] <= profile["step"] * 1.01


def _precondition_under_infinity(rank: int, world_size: int, out_dir: str) -> str:
    import agvm_scenarios as scenarios

    from agvm_ds import AGVM, AGVMConfig, module_param_groups
    from agvm_ds.agvm import initialize

    config = json.loads((REPO / "ds_configs" / "zero3_bf16_infinity.json").read_text())
    for offload in ("offload_optimizer", "offload_param"):
        config["zero_optimization"][offload]["nvme_path"] = out_dir
    config.update(train_micro_batch_size_per_gpu=scenarios.MICRO_BATCH, gradient_accumulation_steps=1,
                  csv_monitor={"enabled": False}, tensorboard={"enabled": False})
    model = scenarios.ToyDetector()
    optimizer = AGVM(torch.optim.AdamW(module_param_groups(model, scenarios.MODULES), lr=1e-3),
                     AGVMConfig(precondition=True))
    try:
        initialize(model=model, optimizer=optimizer, config=config)
    except ValueError as error:
        return str(error)
    return "accepted"


@pytest.mark.slow
def test_preconditioned_agvm_is_refused_where_zero_infinity_keeps_adam_state_on_nvme(tmp_path):
    from distributed import run_ranks

    messages = run_ranks(_precondition_under_infinity, 2, str(tmp_path))
    assert all("offload_optimizer.device=nvme" in m and "agvm.precondition=false" in m for m in messages), messages
