"""The framework-free AGVM core: config, grouping, estimator, modulator. No process group needed."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from agvm_ds import AGVM, MODULE_KEY, AGVMConfig, module_param_groups
from agvm_ds.agvm import (
    GradientMoments,
    GradientVarianceModulator,
    assign_modules,
    moments_from_gradients,
    noise_scale,
    target_factors,
    variance_proxy,
)

# --- config -------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    config = AGVMConfig()
    assert (config.anchor, config.interval, config.ema, config.clamp_min, config.clamp_max) == (
        "backbone", 10, 0.97, 0.5, 10.0)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("interval", 0, "integer >= 1"),
        ("interval", 2.5, "integer >= 1"),
        ("ema", 1.0, "[0, 1)"),
        ("ema", float("nan"), "[0, 1)"),
        ("clamp_min", 0.0, "> 0"),
        ("clamp_max", 0.1, ">= clamp_min"),
        ("start_iter", -1, ">= 0"),
        ("anchor", "", "non-empty"),
        ("precondition", "yes", "true or false"),
    ],
)
def test_bad_value_names_key_and_what_is_allowed(key, value, allowed):
    with pytest.raises(ValueError, match=rf"{key}=.*{re.escape(allowed)}"):
        AGVMConfig(**{key: value})


def test_stop_before_start_is_rejected():
    with pytest.raises(ValueError, match="stop_iter"):
        AGVMConfig(start_iter=10, stop_iter=5)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['intervall'\].*'interval'"):
        AGVMConfig.from_dict({"intervall": 5})


def test_schedule_of_statistics_and_activity():
    config = AGVMConfig(start_iter=100, stop_iter=130, interval=10)
    assert [i for i in range(140) if config.is_stats_iter(i)] == [100, 110, 120, 130]
    assert not config.is_active(99) and config.is_active(100) and config.is_active(130) and not config.is_active(131)
    assert not AGVMConfig(enabled=False).is_active(5)


# --- grouping -----------------------------------------------------------------------------------


class TwoPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.backbone.add_module("fpn", nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)


def test_longest_prefix_wins_and_every_param_is_assigned():
    assigned = assign_modules(TwoPart(), {"backbone": ["backbone"], "fpn": ["backbone.fpn"], "head": ["head"]})
    assert assigned["fpn"] == ["backbone.fpn.weight", "backbone.fpn.bias"]
    assert "backbone.fpn.weight" not in assigned["backbone"]
    assert sum(len(v) for v in assigned.values()) == len(list(TwoPart().parameters()))


def test_parameter_in_no_module_is_named():
    with pytest.raises(ValueError, match=r"'head.weight' belongs to no module"):
        assign_modules(TwoPart(), {"backbone": ["backbone"]})


def test_parameter_in_two_modules_is_named():
    with pytest.raises(ValueError, match=r"'head.weight' matches several modules \['a', 'b'\]"):
        assign_modules(TwoPart(), {"backbone": ["backbone"], "a": ["head"], "b": ["head"]})


def test_module_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"\['ghost'\] match no trainable parameter"):
        assign_modules(TwoPart(), {"backbone": ["backbone"], "head": ["head"], "ghost": ["neck"]})


def test_frozen_parameters_need_no_module():
    model = TwoPart()
    model.head.requires_grad_(False)
    assert "head" not in str(assign_modules(model, {"backbone": ["backbone"]}))


def test_groups_split_decay_and_share_the_module_tag():
    groups = module_param_groups(TwoPart(), {"backbone": ["backbone"], "head": ["head"]}, weight_decay=0.05, lr=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    no_decay = by_name["backbone_no_decay"]
    assert no_decay[MODULE_KEY] == "backbone" and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in by_name["backbone"]["params"]) and by_name["head"]["lr"] == 0.1


def test_optimizer_groups_without_module_tag_are_refused():
    model = TwoPart()
    with pytest.raises(ValueError, match="param group 0 .* has no 'agvm_module' key"):
        AGVM(torch.optim.SGD(model.parameters(), lr=0.1))


def test_unknown_anchor_is_refused():
    groups = module_param_groups(TwoPart(), {"body": ["backbone"], "head": ["head"]})
    with pytest.raises(ValueError, match=r"anchor module 'backbone' is not one of the modules \['body', 'head'\]"):
        AGVM(torch.optim.SGD(groups, lr=0.1))


def test_unattached_wrapper_steps_the_base_optimizer_unchanged():
    torch.manual_seed(0)
    a, b = TwoPart(), TwoPart()
    b.load_state_dict(a.state_dict())
    modules = {"backbone": ["backbone"], "head": ["head"]}
    plain = torch.optim.SGD(module_param_groups(a, modules), lr=0.1, momentum=0.9)
    wrapped = AGVM(torch.optim.SGD(module_param_groups(b, modules), lr=0.1, momentum=0.9))
    for model, opt in ((a, plain), (b, wrapped)):
        for _ in range(3):
            opt.zero_grad()
            model.head(model.backbone(torch.ones(2, 4))).sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert wrapped.state_dict()["state"].keys() == plain.state_dict()["state"].keys()


# --- estimator ----------------------------------------------------------------------------------


def test_moments_of_identical_gradients_give_zero_variance():
    g = torch.randn(1, 100).expand(8, 100)
    a, b = moments_from_gradients(g)
    phi = variance_proxy(GradientMoments(torch.tensor([a]), torch.tensor([b]), 8))
    assert a == pytest.approx(b) and float(phi) == pytest.approx(0.0, abs=1e-9)


def test_proxy_is_the_expected_one_minus_cosine_between_halves():
    """Monte Carlo: mean of the official split-halves 1 - cos equals the mean of our proxy."""
    gen = torch.Generator().manual_seed(0)
    m, dim, trials = 8, 64, 3000
    mean = torch.full((dim,), 0.5)
    official, ours = [], []
    for _ in range(trials):
        g = mean + torch.randn(m, dim, generator=gen)
        half_a, half_b = g[: m // 2].sum(0), g[m // 2 :].sum(0)
        official.append(1 - float(nn.functional.cosine_similarity(half_a, half_b, dim=0)))
        a, b = moments_from_gradients(g)
        ours.append(float(variance_proxy(GradientMoments(torch.tensor([a]), torch.tensor([b]), m))))
    official_t, ours_t = torch.tensor(official), torch.tensor(ours)
    assert float(ours_t.mean()) == pytest.approx(float(official_t.mean()), rel=0.02)
    assert float(ours_t.std()) < float(official_t.std())  # all pairs beat one split


def test_noise_scale_recovers_trace_over_signal():
    gen = torch.Generator().manual_seed(1)
    m, dim, sigma = 64, 4000, 0.5
    g = 1.0 + sigma * torch.randn(m, dim, generator=gen)
    a, b = moments_from_gradients(g)
    expected = dim * sigma**2 / (dim * 1.0)
    measured = float(noise_scale(GradientMoments(torch.tensor([a]), torch.tensor([b]), m)))
    assert measured == pytest.approx(expected, rel=0.05)


def test_moments_need_two_samples():
    with pytest.raises(ValueError, match="at least 2 micro-batch gradients"):
        GradientMoments(torch.ones(1), torch.ones(1), 1)


# --- modulator ----------------------------------------------------------------------------------


def _moments(phi_values, m=8):
    """Moments whose proxy is exactly phi (B = 1): A from phi = 2(A - B) / ((M - 2) B + A)."""
    phi = torch.tensor(phi_values, dtype=torch.float64)
    a = (2 + phi * (m - 2)) / (2 - phi)
    return GradientMoments(a, torch.ones_like(a), m)


def test_moments_helper_inverts_the_proxy():
    assert variance_proxy(_moments([0.1, 0.4])).tolist() == pytest.approx([0.1, 0.4])


def test_target_factor_is_clamped_square_root_of_ratio():
    config = AGVMConfig()
    factors = target_factors(torch.tensor([0.4, 0.1, 0.001, 4.0], dtype=torch.float64), 0, config)
    assert factors.tolist() == pytest.approx([1.0, 2.0, math.sqrt(10.0), math.sqrt(0.5)], rel=1e-5)


def test_ema_moves_factors_from_one_towards_the_target():
    modulator = GradientVarianceModulator(["backbone", "neck"], AGVMConfig(ema=0.9))
    modulator.update(_moments([0.4, 0.1]))
    assert modulator.factor("neck") == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    for _ in range(300):
        modulator.update(_moments([0.4, 0.1]))
    assert modulator.factor("neck") == pytest.approx(2.0, rel=1e-5) and modulator.factor("backbone") == 1.0


def test_non_finite_statistics_leave_the_state_untouched():
    modulator = GradientVarianceModulator(["backbone", "neck"], AGVMConfig(ema=0.5))
    modulator.update(_moments([0.4, 0.1]))
    before = modulator.state_dict()
    bad = GradientMoments(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, float("inf")]), 8)
    assert modulator.update(bad) is False
    after = modulator.state_dict()
    assert torch.equal(before["factors"], after["factors"]) and after["num_rejected"] == 1
    assert after["num_updates"] == before["num_updates"] == 1


def test_state_round_trips_and_checks_module_names():
    a = GradientVarianceModulator(["backbone", "neck"], AGVMConfig())
    a.update(_moments([0.4, 0.1]))
    b = GradientVarianceModulator(["backbone", "neck"], AGVMConfig())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.factors, b.factors) and b.num_updates == 1
    c = GradientVarianceModulator(["backbone", "head"], AGVMConfig())
    with pytest.raises(ValueError, match="do not match"):
        c.load_state_dict(a.state_dict())
