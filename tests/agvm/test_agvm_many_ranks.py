"""AGVM under ZeRO 1-3 on 16 and 32 ranks: the partitions of "hundreds of GPUs".

With many ranks ZeRO cuts every tensor into pieces and leaves ranks without a single element of a
small module (here the toy detector's 8-element ``calibration`` module; on hundreds of GPUs, a
small head). Such a rank adds nothing to the module's reduced-gradient norm, yet all ranks must
agree on A, B and the factors. Every rank's moments and factors are compared with brute force from
the all-gathered fp32 micro-batch gradients, as tests/agvm/test_agvm_deepspeed.py does on 2-4 ranks.

The ranks are gloo processes forked from this one (``run_ranks(start_method="fork")``): spawning
32 processes that each import torch and DeepSpeed would not fit the time or memory of a small machine.
"""
from __future__ import annotations

import agvm_scenarios as scenarios
import pytest
import torch
from agvm_scenarios import CLIP, FP32_TOL, assert_moments_match
from distributed import run_ranks

pytestmark = pytest.mark.slow

ACCUMULATION = {16: 2, 32: 1}  # world size -> gradient accumulation steps
ZERO_STAGES = (1, 2, 3)
STEPS = 4  # statistics steps 0 and 2 (interval 2)
# ZeRO-3 persists no parameter whole (the toy's are all below DeepSpeed's default threshold, a large
# model's are not), so every parameter is partitioned and gathered for forward and backward.
CASE = {"calibrated": True, "clip": CLIP, "log_comms": True, "zero": {"stage3_param_persistence_threshold": 0}}
AGVM_STATS_BYTES = 2 * len(scenarios.CALIBRATED_MODULES) * 8  # A and B per module, float64

PARAMS = [(world, stage) for world in ACCUMULATION for stage in ZERO_STAGES]
IDS = [f"{world}ranks-z{stage}" for world, stage in PARAMS]


@pytest.fixture(scope="module")
def many_rank_run():
    """``run(world, stage)``: each rank's result of the calibrated case, trained once for all tests here."""
    runs: dict[tuple[int, int], list[dict]] = {}

    def run(world: int, stage: int) -> list[dict]:
        if (world, stage) not in runs:
            case = {**CASE, "stage": stage, "gas": ACCUMULATION[world]}
            per_rank = run_ranks(scenarios.train_cases, world, [case], STEPS, True, start_method="fork")
            runs[world, stage] = [cases[0] for cases in per_rank]
        return runs[world, stage]

    return run


def _module_sizes() -> dict[str, int]:
    model = scenarios.ToyDetector(calibrated=True)
    return {module: sum(p.numel() for p in getattr(model, module).parameters())
            for module in scenarios.CALIBRATED_MODULES}


@pytest.mark.parametrize("world, stage", PARAMS, ids=IDS)
def test_moments_and_factors_match_brute_force(many_rank_run, world, stage):
    results = many_rank_run(world, stage)
    for result in results:
        assert_moments_match(result, FP32_TOL)
        assert result["num_micro_batches"] == world * ACCUMULATION[world]
        assert len(result["records"]) == STEPS // 2
        assert min(record["grad_norm"] for record in result["records"]) > 5 * CLIP  # clipping was active
    # a rank whose statistic went astray would carry its own factors from then on
    first = results[0]["agvm"]["modulator"]["factors"]
    assert all(torch.equal(result["agvm"]["modulator"]["factors"], first) for result in results)


@pytest.mark.parametrize("world, stage", PARAMS, ids=IDS)
def test_ranks_hold_no_element_of_the_small_module(many_rank_run, world, stage):
    held = [result["held_elements"] for result in many_rank_run(world, stage)]
    sizes = _module_sizes()
    # the counts are real elements, each on exactly one rank: padding is not counted
    assert {module: sum(h[module] for h in held) for module in sizes} == sizes
    empty = [rank for rank, h in enumerate(held) if h["calibration"] == 0]
    assert empty and len(empty) >= world - sizes["calibration"], held
    # and the large modules are cut into pieces smaller than their largest tensor (32 x 32)
    assert max(h["backbone"] for h in held) < 32 * 32


@pytest.mark.parametrize("world, stage", PARAMS, ids=IDS)
def test_agvm_adds_one_small_all_reduce_per_statistics_step(many_rank_run, world, stage):
    for result in many_rank_run(world, stage):
        assert result["comms"]["agvm_stats"] == {AGVM_STATS_BYTES: len(result["records"])}
