"""AGVM under real DeepSpeed, ZeRO stages 0-3, on CPU ranks (gloo).

Every statistic the wrapper produces is compared with a brute-force computation from all-gathered
fp32 micro-batch gradients (tests/agvm_scenarios.py), so a mistake in how any stage scales, clips,
partitions or accumulates gradients shows up as a number that does not match.
"""
from __future__ import annotations

import math

import agvm_scenarios as scenarios
import pytest
import torch
from distributed import run_ranks

pytestmark = pytest.mark.slow

STAGES = (0, 1, 2, 3)


# --- 2 ranks: every stage, precision, accumulation and clipping mode ------------------------------

TWO_RANK_CASES = {
    **{f"z{s}-fp32": {"stage": s, "clip": scenarios.CLIP} for s in STAGES},
    **{f"z{s}-fp32-gas2": {"stage": s, "gas": 2} for s in STAGES},
    **{f"z{s}-bf16": {"stage": s, "dtype": "bf16", "clip": scenarios.CLIP} for s in STAGES},
    **{f"z{s}-autocast-bf16": {"stage": s, "dtype": "autocast_bf16", "clip": scenarios.CLIP} for s in STAGES},
    **{f"z{s}-fp16-overflow": {"stage": s, "dtype": "fp16", "gas": 2, "clip": scenarios.CLIP, "scale_power": 22}
       for s in (1, 2, 3)},
    "z2-adamw": {"stage": 2, "optimizer": "adamw", "clip": scenarios.CLIP},
    "z3-adamw-gas2": {"stage": 3, "optimizer": "adamw", "gas": 2},
    "z0-bf16-precond": {"stage": 0, "dtype": "bf16", "optimizer": "adamw", "precondition": True},
    # identical data on every rank: the stratified estimate of ZeRO 1-3 then equals the exact one
    **{f"z{s}-precond-same-data": {"stage": s, "optimizer": "adamw", "precondition": True, "same_data": True,
                                   "gas": 2, "clip": scenarios.CLIP, "check": s == 0} for s in STAGES},
}
CHECKED_CASES = [name for name, case in TWO_RANK_CASES.items() if case.get("check", True)]
TOLERANCE = {"fp32": scenarios.FP32_TOL, "bf16": 2e-2, "autocast_bf16": 2e-2, "fp16": 5e-3}


@pytest.fixture(scope="module")
def two_rank_runs() -> dict[str, list[dict]]:
    names = list(TWO_RANK_CASES)
    per_rank = run_ranks(scenarios.train_cases, 2, [TWO_RANK_CASES[n] for n in names], 20, True)
    return {name: [rank_results[i] for rank_results in per_rank] for i, name in enumerate(names)}


@pytest.mark.parametrize("name", CHECKED_CASES)
def test_moments_match_brute_force_on_two_ranks(two_rank_runs, name):
    case = TWO_RANK_CASES[name]
    for rank_result in two_rank_runs[name]:
        scenarios.assert_moments_match(rank_result, TOLERANCE[case.get("dtype", "fp32")])
        assert rank_result["num_micro_batches"] == 2 * case.get("gas", 1)


@pytest.mark.parametrize("stage", STAGES)
def test_clipping_was_active_and_undone(two_rank_runs, stage):
    records = two_rank_runs[f"z{stage}-fp32"][0]["records"]
    assert min(r["grad_norm"] for r in records) > 5 * scenarios.CLIP  # B would be off by (norm / clip)^2 if not undone


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_overflowed_fp16_windows_are_discarded(two_rank_runs, stage):
    result = two_rank_runs[f"z{stage}-fp16-overflow"][0]
    assert result["skipped_steps"] > 0
    assert result["iteration"] == 20 - result["skipped_steps"]  # AGVM counts applied steps only
    scenarios.assert_moments_match(result, TOLERANCE["fp16"])


def test_all_stages_train_to_the_same_parameters(two_rank_runs):
    reference = two_rank_runs["z0-fp32"][0]
    for stage in (1, 2, 3):
        result = two_rank_runs[f"z{stage}-fp32"][0]
        for name, value in reference["params"].items():
            torch.testing.assert_close(result["params"][name], value, rtol=scenarios.FP32_TOL, atol=scenarios.FP32_TOL)
        assert result["factors"] == pytest.approx(reference["factors"], rel=scenarios.FP32_TOL)
    assert max(abs(f - 1.0) for f in reference["factors"].values()) > 0.01
    assert reference["factors"]["backbone"] == 1.0


@pytest.mark.parametrize("name", ["z0-fp32", "z2-fp32", "z3-bf16"])
def test_scheduled_learning_rates_are_restored(two_rank_runs, name):
    result = two_rank_runs[name][0]
    assert result["lrs"] == result["scheduled_lrs"]
    assert result["lrs"][0] == pytest.approx(0.05 / (1 + 0.05 * 20))


def test_agvm_state_is_identical_on_every_rank(two_rank_runs):
    for name in ("z0-fp32", "z3-fp32", "z2-bf16"):
        rank0, rank1 = (r["agvm"]["modulator"] for r in two_rank_runs[name])
        assert torch.equal(rank0["factors"], rank1["factors"])


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_preconditioned_moments_with_partitioned_state_match_zero0(two_rank_runs, stage):
    exact = two_rank_runs["z0-precond-same-data"][0]["records"]
    stratified = two_rank_runs[f"z{stage}-precond-same-data"][0]["records"]
    assert [r["step"] for r in stratified] == [r["step"] for r in exact] and len(exact) >= 5
    for got, want in zip(stratified, exact):
        assert scenarios.max_rel_err(got["A"], want["A"]) < scenarios.FP32_TOL
        assert scenarios.max_rel_err(got["B"], want["B"]) < scenarios.FP32_TOL


def test_preconditioning_changes_the_measurement(two_rank_runs):
    plain = two_rank_runs["z2-adamw"][0]["records"][-1]["B"]
    preconditioned = two_rank_runs["z2-precond-same-data"][0]["records"][-1]["B"]
    assert scenarios.max_rel_err(preconditioned, plain) > 10  # |g / sqrt(v)| ~ 1 per coordinate, |g| << 1


# --- 3 and 4 ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("world, gas", [(3, 1), (4, 2)])
def test_moments_match_brute_force_on_more_ranks(world, gas):
    cases = [{"stage": s, "gas": gas, "clip": scenarios.CLIP} for s in STAGES]
    per_rank = run_ranks(scenarios.train_cases, world, cases, 6, True)
    for rank_results in per_rank:
        for result in rank_results:
            scenarios.assert_moments_match(result, scenarios.FP32_TOL)
            assert result["num_micro_batches"] == world * gas


def test_preconditioned_moments_on_three_ranks_match_zero0():
    """A 1-element parameter on 3 ranks: ZeRO-3 gives one rank no part of it."""
    base = {"optimizer": "adamw", "precondition": True, "same_data": True, "check": False, "gas": 2,
            "clip": scenarios.CLIP, "tiny_param": True}
    cases = [{**base, "stage": s} for s in STAGES]
    exact, *partitioned = run_ranks(scenarios.train_cases, 3, cases, 6, False)[0]
    assert len(exact["records"]) >= 4
    for result in partitioned:
        for got, want in zip(result["records"], exact["records"], strict=True):
            assert scenarios.max_rel_err(got["A"], want["A"]) < scenarios.FP32_TOL
            assert scenarios.max_rel_err(got["B"], want["B"]) < scenarios.FP32_TOL


# --- resume ---------------------------------------------------------------------------------------

RESUME_CASES = [{"stage": s, "clip": scenarios.CLIP, "gas": 2} for s in STAGES] + [{"stage": 2, "dtype": "bf16"}]


def test_resume_is_bitwise_exact_in_every_stage(tmp_path):
    steps, save_at = 12, 5  # save_at is off the statistics interval: pending state must not matter
    straight = run_ranks(scenarios.train_cases, 2, RESUME_CASES, steps, False)[0]
    run_ranks(scenarios.resume_cases, 2, RESUME_CASES, steps, save_at, str(tmp_path), False)
    resumed = run_ranks(scenarios.resume_cases, 2, RESUME_CASES, steps, save_at, str(tmp_path), True)[0]
    for case, a, b in zip(RESUME_CASES, straight, resumed):
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), (case, name)
        assert torch.equal(a["agvm"]["modulator"]["factors"], b["agvm"]["modulator"]["factors"]), case
        assert a["agvm"]["iteration"] == b["agvm"]["iteration"] == steps
        assert a["agvm"]["modulator"]["num_updates"] == b["agvm"]["modulator"]["num_updates"]
        assert a["lrs"] == b["lrs"]


# --- convergence on known noise -------------------------------------------------------------------

def test_factors_converge_to_analytic_values():
    world, gas = 2, 4
    m = world * gas
    factors = run_ranks(scenarios.known_noise, world, 150, gas)[0]
    # halves of m/2 micro-batches: 1 - E cos = (2 s^2 / m) / (mu^2 + 2 s^2 / m) per coordinate
    phi = [(2 * s * s / m) / (mu * mu + 2 * s * s / m) for mu, s in zip(scenarios.KNOWN_MEAN, scenarios.KNOWN_STD)]
    for i, module in enumerate(("backbone", "neck", "head")):
        analytic = math.sqrt(min(max(phi[0] / phi[i], 0.5), 10.0))
        assert factors[module] == pytest.approx(analytic, rel=0.05), module
    assert factors["head"] > 2.5  # the check is not vacuous: the factors moved far from 1


# --- configurations that must fail clearly ----------------------------------------------------------

def test_single_micro_batch_keeps_factors_at_one():
    result = run_ranks(scenarios.train_cases, 1, [{"stage": 2}], 6, False)[0][0]
    assert result["num_micro_batches"] == 1
    assert set(result["factors"].values()) == {1.0}
    assert result["agvm"]["modulator"]["num_updates"] == 0


def test_preconditioning_without_adam_state_is_refused():
    message = run_ranks(scenarios.expect_error, 2, {"stage": 1, "precondition": True})[0]
    assert "precondition=True needs an Adam-type base optimizer" in message and "SGD" in message


@pytest.mark.parametrize("case", [{"stage": 2}, {"stage": 0, "dtype": "fp16"}], ids=["ok", "refused"])
def test_initialize_leaves_no_shared_memory_segment_behind(case):
    assert run_ranks(scenarios.shared_memory_left, 2, case) == [[], []]


def test_fp16_with_zero_stage_0_is_refused_with_the_reason():
    message = run_ranks(scenarios.expect_error, 2, {"stage": 0, "dtype": "fp16"})[0]
    assert "fp16 with ZeRO stage 0 is not supported" in message and "bf16" in message
