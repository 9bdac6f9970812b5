"""Layer-wise LAMB and LARS (``agvm_ds.optim``): one trust ratio per original tensor under ZeRO 0-3.

Brute force: after every step the single-process reference -- timm's ``Lamb`` with
``max_grad_norm=None``, ``agvm_scenarios.ReferenceLars`` -- is fed the weights and gradients that the
engine's optimizer got, assembled whole from every rank's fragments, and must land where the engine
did. The error is measured relative to the size of the update, so 1e-4 means the trust ratios agree
to fp32 precision, while a ratio per rank's share (timm's Lamb inside ZeRO) is off by tens of percent.
Gradient accumulation (2) and DeepSpeed's clipping (0.02, below the toy's gradient norm) are on in
every case, and the toy has a 1-element tensor (``head.offset``) that most ranks hold none of.
"""
from __future__ import annotations

import copy
from collections import Counter

import agvm_scenarios as scenarios
import pytest
import torch
from distributed import run_ranks
from torch import nn

from agvm_ds import module_param_groups
from agvm_ds.optim import Lamb, Lars

STAGES = (0, 1, 2, 3)
WORLDS = (1, 2, 3, 4)
STEPS = 3
TOL = 1e-4  # of the update's norm; fp32 rounding of the update is ~1e-6 of it
BASE_CASES = {f"z{s}-{o}": {"stage": s, "optimizer": o} for s in STAGES for o in ("lamb", "lars")}
EXTRA_CASES = {  # on 2 ranks
    **{f"z{s}-lamb-bf16": {"stage": s, "optimizer": "lamb", "dtype": "bf16"} for s in STAGES},
    "z3-lars-bf16": {"stage": 3, "optimizer": "lars", "dtype": "bf16"},
    "z2-lamb-fp16": {"stage": 2, "optimizer": "lamb", "dtype": "fp16"},
    "z1-lamb-no-bias-correction": {"stage": 1, "optimizer": "lamb", "bias_correction": False},
    "z3-lamb-no-bias-correction": {"stage": 3, "optimizer": "lamb", "bias_correction": False},
    "z2-lamb-norms-excluded": {"stage": 2, "optimizer": "lamb", "adapt_all": False},
    "z3-lars-norms-excluded": {"stage": 3, "optimizer": "lars", "adapt_all": False},
    "z2-timm-lamb": {"stage": 2, "optimizer": "timm_lamb"},  # the old optimizer: must NOT match
}
# the comms logger is process-wide: one logged case per run, last, so that it alone is recorded
LOGGED_CASES = {2: {"stage": 2, "optimizer": "lamb", "log_comms": True},
                3: {"stage": 3, "optimizer": "lars", "log_comms": True,
                    "zero": {"stage3_param_persistence_threshold": 0}},
                4: {"stage": 1, "optimizer": "lamb", "log_comms": True, "adapt_all": False}}


def cases_of(world: int) -> dict[str, dict]:
    cases = dict(BASE_CASES)
    if world == 2:
        cases.update(EXTRA_CASES)
    if world in LOGGED_CASES:
        cases["logged"] = LOGGED_CASES[world]
    return cases


@pytest.fixture(scope="module")
def runs():
    """``run(world)``: {case name: each rank's result}, trained once for all tests here."""
    done: dict[int, dict[str, list[dict]]] = {}

    def run(world: int) -> dict[str, list[dict]]:
        if world not in done:
            cases = cases_of(world)
            per_rank = run_ranks(scenarios.layerwise_cases, world, list(cases.values()), STEPS, start_method="fork")
            done[world] = {name: [results[i] for results in per_rank] for i, name in enumerate(cases)}
        return done[world]

    return run


def max_error(result: dict) -> float:
    return max(max(step.values()) for step in result["errors"])


# --- multi-rank: every stage on 1-4 ranks ------------------------------------------------------

MATCHED = [(w, n) for w in WORLDS for n in cases_of(w) if n != "z2-timm-lamb"]


@pytest.mark.slow
@pytest.mark.parametrize("world, name", MATCHED, ids=[f"{w}ranks-{n}" for w, n in MATCHED])
def test_each_step_equals_the_single_process_optimizer(runs, world, name):
    for result in runs(world)[name]:
        assert len(result["errors"]) == STEPS - result["skipped_steps"] > 0
        assert max_error(result) < TOL, result["errors"]
        # DeepSpeed clipped (the toy's norm is far above it) and the optimizer did not clip again
        assert max(result["grad_norms"]) == pytest.approx(scenarios.CLIP, rel=1e-3)


@pytest.mark.slow
def test_a_trust_ratio_per_rank_share_does_not_match(runs):
    """The test can fail: timm's Lamb inside ZeRO-2 (what build_optimizer used before) is far off."""
    assert max_error(runs(2)["z2-timm-lamb"][0]) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("world", (2, 3, 4))
@pytest.mark.parametrize("stage", (1, 2, 3))
def test_tensors_span_ranks_and_the_tiny_one_is_on_one(runs, world, stage):
    holders = runs(world)[f"z{stage}-lamb"][0]["holders"]
    assert holders["head.offset"] == 1  # 1 element: every other rank holds none of it
    assert max(holders.values()) > 1  # a tensor whose slices span ranks


@pytest.mark.slow
def test_agvm_scales_the_lr_and_the_trust_ratio_still_matches(runs):
    result = runs(2)["z2-lamb"][0]
    assert max(abs(f - 1.0) for f in result["factors"][-2].values()) > 1e-3  # the last two steps used factors != 1
    assert max_error(result) < TOL


def _tensors_per_module() -> dict[str, list[torch.Tensor]]:
    model = scenarios.ToyDetector(tiny_param=True)
    return {module: list(getattr(model, module).parameters()) for module in scenarios.MODULES}


@pytest.mark.slow
@pytest.mark.parametrize("world", sorted(LOGGED_CASES))
def test_one_all_reduce_of_8_bytes_per_adapted_tensor(runs, world):
    """ZeRO 1-3 step one group (sub-group) per call: one all-reduce per call, of 2 fp32 per tensor
    that adapts; in all, 8 bytes per adapted tensor per step. Nothing is gathered."""
    case = LOGGED_CASES[world]
    adapted = [[p for p in params if case.get("adapt_all", True) or p.ndim > 1]
               for params in _tensors_per_module().values()]
    per_step = Counter(8 * len(tensors) for tensors in adapted if tensors)  # bytes -> calls
    for result in runs(world)["logged"]:
        assert result["comms"]["layerwise_norms"] == {size: calls * STEPS for size, calls in per_step.items()}
        assert sum(size * calls for size, calls in result["comms"]["layerwise_norms"].items()) == \
            8 * sum(len(t) for t in adapted) * STEPS


@pytest.mark.slow
@pytest.mark.parametrize("stage", (2, 3))
def test_offloaded_optimizer_is_refused(stage):
    case = {"stage": stage, "optimizer": "lamb", "zero": {"offload_optimizer": {"device": "cpu"}},
            "deepspeed": {"zero_force_ds_cpu_optimizer": False}, "refused": True}
    results = run_ranks(scenarios.layerwise_cases, 2, [case], STEPS, start_method="fork")
    errors = [cases[0]["error"] for cases in results]
    assert all("offload_optimizer is not supported by the layer-wise optimizers" in e for e in errors), errors


# --- single process: the math against the references -------------------------------------------

def _twin_steps(make, make_reference, steps: int = 4) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    reference = copy.deepcopy(model)
    groups = module_param_groups(model, {"body": [""]}, weight_decay=0.01)  # LayerNorm, biases: not adapted
    ref_groups = module_param_groups(reference, {"body": [""]}, weight_decay=0.01)
    optimizer, ref_optimizer = make(groups), make_reference(ref_groups)
    for step in range(steps):
        x = torch.randn(7, 6, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    return max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("bias_correction", (True, False))
def test_lamb_equals_timm_lamb_without_clipping(bias_correction):
    from timm.optim import Lamb as TimmLamb

    kwargs = dict(lr=0.01, eps=1e-6, weight_decay=0.01, bias_correction=bias_correction)
    assert _twin_steps(lambda g: Lamb(g, **kwargs), lambda g: TimmLamb(g, max_grad_norm=None, **kwargs)) < 1e-6


def test_lars_equals_the_reference_lars():
    kwargs = dict(lr=0.5, momentum=0.9, trust_coefficient=0.02, eps=1e-8)
    assert _twin_steps(lambda g: Lars(g, weight_decay=0.01, **kwargs),
                       lambda g: scenarios.ReferenceLars(g, **kwargs)) < 1e-6


def test_a_flat_partition_without_layout_is_refused():
    weight = nn.Parameter(torch.ones(3, 4))
    optimizer = Lamb([weight])
    optimizer.param_groups[0]["params"] = [nn.Parameter(torch.ones(7))]  # what DeepSpeed's ZeRO does
    optimizer.param_groups[0]["params"][0].grad = torch.ones(7)
    with pytest.raises(RuntimeError, match=r"shape \(7,\).*agvm_ds.initialize"):
        optimizer.step()


def test_config_knobs_are_checked():
    from agvm_ds.engine.config import OptimizerConfig, load_config

    assert OptimizerConfig(name="lars", trust_coefficient=0.02).trust_coefficient == 0.02
    with pytest.raises(ValueError, match="optimizer.trust_coefficient"):
        load_config(None, ["optimizer.name=lars", "optimizer.trust_coefficient=0"])
    assert load_config(None, ["optimizer.name=lamb", "optimizer.bias_correction=false"]).optimizer.bias_correction \
        is False
