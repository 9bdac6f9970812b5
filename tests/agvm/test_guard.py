"""The divergence guard of AGVM (docs/agvm.md, "The divergence guard"): framework-free, no process group."""
from __future__ import annotations

import math
import re

import pytest
import torch

from agvm_ds.agvm import AGVMConfig, GradientMoments, GradientVarianceModulator, variance_proxy
from agvm_ds.agvm.estimator import gradient_norm
from agvm_ds.agvm.modulator import guard_holds, guarded_factors, log_norm, running_level

MODULES = ["backbone", "fpn", "roi_box_head"]
M = 32  # micro-batch gradients per step, as the recorded failure at 16B = 32


def _moments(phi_values, norms, m=M):
    """Moments with the given proxy phi and RMS micro-batch gradient norm sqrt(A) per module.

    From phi = 2(A - B) / ((M - 2) B + A) at B = 1, then A and B scaled together (phi is scale-free).
    """
    phi = torch.tensor(phi_values, dtype=torch.float64)
    a = (2 + phi * (m - 2)) / (2 - phi)
    scale = torch.tensor(norms, dtype=torch.float64).square() / a
    return GradientMoments(a * scale, scale, m)


def _run(config: AGVMConfig, measurements) -> GradientVarianceModulator:
    modulator = GradientVarianceModulator(MODULES, config)
    for moments in measurements:
        assert modulator.update(moments)
    return modulator


def _calm(steps: int, seed: int = 0):
    """Noisy but calm statistics: phi around 0.9 / 0.6 / 0.5, norms within +-30% of a slow drift."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        phi = (torch.tensor([0.9, 0.6, 0.5]) * (1 + 0.2 * (torch.rand(3, generator=generator) - 0.5))).tolist()
        norms = (torch.tensor([5.0, 2.0, 1.0]) * (1 - step / (2 * steps))
                 * (1 + 0.6 * (torch.rand(3, generator=generator) - 0.5))).tolist()
        out.append(_moments(phi, norms))
    return out


def _spike(steps: int = 6):
    """The recorded failure's shape: the FPN's and RoI head's gradients 20-100x larger and coherent (phi 0.01-0.03)."""
    return [_moments([0.9, 0.02, 0.03], [5.0, 40.0 * (1 + k), 20.0 * (1 + k)]) for k in range(steps)]


def test_helper_gives_the_asked_phi_and_norm():
    moments = _moments([0.9, 0.02, 0.5], [5.0, 40.0, 1.0])
    assert variance_proxy(moments).tolist() == pytest.approx([0.9, 0.02, 0.5])
    assert gradient_norm(moments).tolist() == pytest.approx([5.0, 40.0, 1.0])


def test_config_declares_the_guards_ranges():
    assert AGVMConfig().guard is False  # off by default: no run has shown it helps yet
    for key, value, allowed in [("guard_ratio", 1.0, "> 1"), ("guard_ema", 1.0, "[0, 1)"),
                                ("guard_phi_drop", 1.0, "(0, 1)"), ("guard_phi_drop", 0.0, "(0, 1)"),
                                ("guard", "yes", "true or false")]:
        with pytest.raises(ValueError, match=rf"{key}=.*{re.escape(allowed)}"):
            AGVMConfig(**{key: value})
    assert AGVMConfig.from_dict({"guard": True, "guard_phi_drop": None}).guard_phi_drop is None


def test_spike_raises_the_factor_without_the_guard_and_is_held_with_it():
    measurements = _calm(10) + _spike()
    plain = GradientVarianceModulator(MODULES, AGVMConfig(ema=0.95))
    guarded = GradientVarianceModulator(MODULES, AGVMConfig(ema=0.95, guard=True))
    for moments in measurements[:10]:
        plain.update(moments)
        guarded.update(moments)
    before = guarded.factors.clone()
    assert torch.equal(before, plain.factors)
    for moments in measurements[10:]:
        plain.update(moments)
        guarded.update(moments)
        assert guarded.held_modules() == ["fpn", "roi_box_head"]
    # without the guard AGVM reads the coherent spike as calm and raises both heads' lr
    assert plain.factor("fpn") > before[1] + 0.1 and plain.factor("roi_box_head") > before[2] + 0.1
    assert guarded.factor("fpn") <= before[1] and guarded.factor("roi_box_head") <= before[2]
    assert guarded.factor("backbone") == 1.0 and guarded.num_held.tolist() == [0, 6, 6]
    record = guarded.as_dict()["fpn"]
    assert record["held"] == 1.0 and record["norm_ratio"] > 2.0
    assert "held" not in plain.as_dict()["fpn"]  # the guard off logs what it always did


def test_calm_training_is_bitwise_unchanged_by_the_guard():
    for seed in range(3):
        measurements = _calm(60, seed)
        plain = _run(AGVMConfig(ema=0.9), measurements)
        for guard in (AGVMConfig(ema=0.9, guard=True), AGVMConfig(ema=0.9, guard=True, guard_phi_drop=0.25)):
            guarded = _run(guard, measurements)
            assert torch.equal(guarded.factors, plain.factors), seed
            assert guarded.num_held.tolist() == [0, 0, 0]


def test_the_guard_releases_when_the_norm_settles():
    config = AGVMConfig(ema=0.9, guard=True, guard_ema=0.5)
    modulator = _run(config, _calm(5) + _spike(2))
    held_at = modulator.factor("fpn")
    # the spike's size persists: the level catches up and the coherent module may rise again
    for _ in range(6):
        modulator.update(_moments([0.9, 0.02, 0.03], [5.0, 80.0, 40.0]))
    assert not modulator.held_modules() and modulator.factor("fpn") > held_at


def test_a_held_module_may_still_fall():
    factors = torch.tensor([1.0, 1.5, 1.5], dtype=torch.float64)
    smoothed = torch.tensor([1.0, 1.2, 1.8], dtype=torch.float64)
    held = torch.tensor([False, True, True])
    assert guarded_factors(factors, smoothed, held).tolist() == [1.0, 1.2, 1.5]
    assert guarded_factors(factors, smoothed, torch.zeros(3, dtype=torch.bool)).equal(smoothed)
    # fallback: a held module is also brought down to the scheduled lr; one already below 1 stays lower
    factors = torch.tensor([1.0, 1.5, 0.7], dtype=torch.float64)
    assert guarded_factors(factors, smoothed, held, fallback=True).tolist() == [1.0, 1.0, 0.7]
    assert guarded_factors(factors, smoothed, ~held, fallback=True).tolist() == [1.0, 1.2, 1.8]  # not held: smoothed


def test_fallback_trains_a_held_module_at_the_scheduled_lr_and_lets_it_rise_after():
    config = AGVMConfig(ema=0.95, guard=True, guard_action="fallback")
    modulator = _run(config, _calm(10))
    assert modulator.factor("fpn") > 1.0 and modulator.factor("roi_box_head") > 1.0
    for moments in _spike(3):
        modulator.update(moments)
        assert modulator.factor("fpn") == 1.0 and modulator.factor("roi_box_head") == 1.0
    assert modulator.factor("backbone") == 1.0
    for moments in _calm(40, seed=1):
        modulator.update(moments)
    assert not modulator.held_modules() and modulator.factor("fpn") > 1.0
    with pytest.raises(ValueError, match=r"guard_action=.*hold.*fallback"):
        AGVMConfig(guard_action="reset")


def test_first_measurement_and_zero_gradients():
    nan = torch.full((2,), float("nan"), dtype=torch.float64)
    config = AGVMConfig(guard=True, guard_phi_drop=0.5)
    norms, phi = torch.tensor([0.0, 10.0], dtype=torch.float64), torch.tensor([0.0, 0.01], dtype=torch.float64)
    size = log_norm(norms)
    assert torch.isnan(size[0]) and size[1] == math.log(10.0)  # no gradient: no measurement of its size
    assert guard_holds(size, nan, phi, nan, config).tolist() == [False, False]  # no past level: never held
    level = running_level(nan, size, 0.9)
    assert torch.isnan(level[0]) and level[1] == math.log(10.0)
    assert running_level(level, torch.tensor([math.log(5.0), math.nan], dtype=torch.float64), 0.5).tolist()[1] == \
        math.log(10.0)  # a module without gradient keeps its level
    assert guard_holds(size + 5, level, phi, phi, AGVMConfig()).tolist() == [False, False]  # guard off


MEASURED_FPN_NORMS = [1, 3.41, 0.903, 1.13, 1.01, 0.53, 28.6, 1170, 47.4, 277, 68.5, 158, 226, 6900]
"""sqrt(A) of the FPN at the statistics steps 43, 48, ..., 108 of the guarded run of b32_sgd_agvm_s0 (relative
to step 43), reconstructed from its logged norm_ratio; the spike starts at step 73 (index 6)."""


def test_geometric_level_holds_through_the_measured_spike():
    config = AGVMConfig(guard=True)
    level, held = torch.tensor([math.nan], dtype=torch.float64), []
    for norm in MEASURED_FPN_NORMS:
        size = log_norm(torch.tensor([norm], dtype=torch.float64))
        held.append(bool(guard_holds(size, level, torch.zeros(1), torch.zeros(1), config)))
        level = running_level(level, size, config.guard_ema)
    assert held[6:] == [True] * 8  # every spike step; a linear level let go at 83, 93, 98, 103 (measured)
    assert held[:6] == [False, True, False, False, False, False]  # 48: the norm grew 3.4x after warm-up


def test_abrupt_phi_drop_holds_only_when_asked():
    calm = [_moments([0.9, 0.6, 0.5], [5.0, 2.0, 1.0])] * 10
    drop = [_moments([0.9, 0.05, 0.5], [5.0, 2.0, 1.0])]  # same size, phi of the FPN falls 12x
    assert _run(AGVMConfig(guard=True), calm + drop).held_modules() == []
    assert _run(AGVMConfig(guard=True, guard_phi_drop=0.25), calm + drop).held_modules() == ["fpn"]


def test_guard_state_round_trips_and_resume_is_bitwise_exact():
    config = AGVMConfig(ema=0.95, guard=True, guard_phi_drop=0.25)
    measurements = _calm(10) + _spike(3) + _calm(5, seed=1)
    straight = _run(config, measurements)
    first = _run(config, measurements[:11])
    resumed = GradientVarianceModulator(MODULES, config)
    resumed.load_state_dict(first.state_dict())
    for moments in measurements[11:]:
        resumed.update(moments)
    state, expected = resumed.state_dict(), straight.state_dict()
    for key in ("factors", "phi", "noise_scale"):
        assert torch.equal(state[key], expected[key]), key
    for key, value in expected["guard"].items():
        assert torch.equal(state["guard"][key], value) or (
            value.is_floating_point() and torch.equal(state["guard"][key].isnan(), value.isnan())
            and torch.equal(state["guard"][key].nan_to_num(), value.nan_to_num())), key


def test_checkpoint_from_before_the_guard_loads_with_fresh_levels():
    modulator = _run(AGVMConfig(guard=True), _calm(3))
    old = {key: value for key, value in modulator.state_dict().items() if key != "guard"}
    loaded = GradientVarianceModulator(MODULES, AGVMConfig(guard=True))
    loaded.load_state_dict(old)
    assert torch.equal(loaded.factors, modulator.factors)
    assert torch.isnan(loaded.log_norm_level).all() and loaded.num_held.tolist() == [0, 0, 0]


def test_non_finite_statistics_leave_the_guard_untouched():
    modulator = _run(AGVMConfig(guard=True), _calm(3))
    before = modulator.state_dict()["guard"]
    bad = GradientMoments(torch.tensor([math.nan, 1.0, 1.0]), torch.ones(3), M)
    assert modulator.update(bad) is False
    after = modulator.state_dict()["guard"]
    assert all(torch.equal(before[k], after[k]) for k in ("log_norm_level", "phi_level", "held", "num_held"))
