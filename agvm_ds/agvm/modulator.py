"""The modulation rule of AGVM: variance proxies in, smoothed learning-rate factors out.

    mu_hat_i = sqrt(clamp((phi_anchor + eps) / (phi_i + eps), clamp_min, clamp_max))
    mu_i    <- ema * mu_i + (1 - ema) * mu_hat_i          (mu_i starts at 1)

The anchor's factor is 1 by construction. The state is a handful of floats, so it is checkpointed
whole (the official code loses it on resume and restarts every factor at 1).

The divergence guard (``config.guard``) keeps a module's factor from rising at a statistics step where
its gradient norm sqrt(A) exceeds ``guard_ratio`` x its running geometric level (or, optionally, its phi fell below
``guard_phi_drop`` x its running phi level): mu_i <- min(mu_i, ema * mu_i + (1 - ema) * mu_hat_i), and with
``guard_action: fallback`` also mu_i <- min(mu_i, 1), the scheduled lr. A loss
spike gives large gradients that agree across micro-batches, so phi falls and AGVM alone would raise the
lr of the very module that diverges. The levels are EMAs over statistics steps of all-reduced values, so
they are identical on every rank, and they are tracked even with the guard off (it can be switched on
at a resume with warm levels); they are checkpointed with the factors.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .config import AGVMConfig
from .estimator import GradientMoments, gradient_norm, noise_scale, variance_proxy

__all__ = ["target_factors", "running_level", "log_norm", "guard_holds", "guarded_factors", "GradientVarianceModulator"]


def target_factors(phi: torch.Tensor, anchor_index: int, config: AGVMConfig) -> torch.Tensor:
    """Unsmoothed factors mu_hat for one measurement of phi (one entry per module)."""
    ratio = (phi[anchor_index] + config.eps) / (phi + config.eps)
    return ratio.clamp(config.clamp_min, config.clamp_max).sqrt()


def running_level(level: torch.Tensor, value: torch.Tensor, ema: float) -> torch.Tensor:
    """EMA of a per-module statistic over statistics steps; a module's first value (level nan) starts it.

    Seeding with the first value rather than 0 avoids a warm-up in which every value looks far above
    its level. A nan value (no measurement for that module) leaves its level as it was.
    """
    smoothed = torch.where(torch.isnan(level), value, ema * level + (1.0 - ema) * value)
    return torch.where(torch.isnan(value), level, smoothed)


def log_norm(norm: torch.Tensor) -> torch.Tensor:
    """log sqrt(A), the statistic whose EMA is the guard's running level; nan where a module had no gradient.

    In log space, so the level is a running geometric mean: a spike's norms, 10-1000x the calm ones and
    jumping by 10x between statistics steps (measured, docs/agvm.md), barely move it, whereas a linear EMA
    takes 10% of a 300x jump at once and then reads the next spike step, 30x the calm, as normal.
    """
    return torch.where(norm > 0, norm.clamp_min(1e-300).log(), torch.full_like(norm, float("nan")))


def guard_holds(log_norm_now: torch.Tensor, log_norm_level: torch.Tensor, phi: torch.Tensor,
                phi_level: torch.Tensor, config: AGVMConfig) -> torch.Tensor:
    """Which modules the divergence guard holds at this step (bool, one per module).

    Held: the gradient norm exceeds ``guard_ratio`` x its running (geometric) level, or, with
    ``guard_phi_drop`` set, phi fell below ``guard_phi_drop`` x its running level. The levels are those
    of past statistics steps, so a spike is compared with the calm before it; a nan level (no past step)
    or value never holds. All False when the guard is off.
    """
    if not config.guard:
        return torch.zeros_like(log_norm_now, dtype=torch.bool)
    held = log_norm_now > math.log(config.guard_ratio) + log_norm_level
    if config.guard_phi_drop is not None:
        held = held | (phi < config.guard_phi_drop * phi_level)
    return held


def guarded_factors(factors: torch.Tensor, smoothed: torch.Tensor, held: torch.Tensor,
                    fallback: bool = False) -> torch.Tensor:
    """The new factors: the smoothed ones, but no higher than the old one where a module is held, and with
    ``fallback`` no higher than 1 either (the scheduled lr).

    A held module may still fall (its phi may rise in a spike), only an increase is refused; where no
    module is held the smoothed factors are returned unchanged, bit for bit.
    """
    limited = torch.minimum(factors, smoothed)
    if fallback:
        limited = limited.clamp_max(1.0)
    return torch.where(held, limited, smoothed)


class GradientVarianceModulator:
    """Owns the per-module AGVM state and updates it from one step's gradient moments.

    Framework-free: it never touches an optimizer or a process group, so it is tested on its own and
    shared by every integration.
    """

    def __init__(self, module_names: Sequence[str], config: AGVMConfig) -> None:
        names = list(module_names)
        if len(set(names)) != len(names):
            raise ValueError(f"AGVM: module names must be unique, got {names}")
        if config.anchor not in names:
            raise ValueError(f"AGVM: anchor module {config.anchor!r} is not one of the modules {names}")
        self.module_names = names
        self.config = config
        self.anchor_index = names.index(config.anchor)
        self.factors = torch.ones(len(names), dtype=torch.float64)
        self.phi = torch.full((len(names),), float("nan"), dtype=torch.float64)
        self.noise_scale = torch.full((len(names),), float("nan"), dtype=torch.float64)
        self.num_updates = 0
        self.num_rejected = 0
        self._reset_guard()

    def _reset_guard(self) -> None:
        """The guard's state before any measurement (also what a checkpoint from before the guard loads)."""
        n = len(self.module_names)
        self.log_norm_level = torch.full((n,), float("nan"), dtype=torch.float64)
        self.phi_level = torch.full((n,), float("nan"), dtype=torch.float64)
        self.norm_ratio = torch.full((n,), float("nan"), dtype=torch.float64)
        self.held = torch.zeros(n, dtype=torch.bool)
        self.num_held = torch.zeros(n, dtype=torch.int64)

    def update(self, moments: GradientMoments) -> bool:
        """Folds one measurement into the smoothed factors.

        Returns False, leaving the state untouched, when the moments are not finite (a NaN/inf
        gradient must never reach the EMA, which would carry it forever).
        """
        if moments.mean_sq_norm.numel() != len(self.module_names):
            raise ValueError(
                f"AGVM: got moments for {moments.mean_sq_norm.numel()} modules, expected {len(self.module_names)}"
            )
        if not moments.is_finite():
            self.num_rejected += 1
            return False
        phi = variance_proxy(moments)
        size = log_norm(gradient_norm(moments))
        mu_hat = target_factors(phi, self.anchor_index, self.config)
        ema = self.config.ema
        held = guard_holds(size, self.log_norm_level, phi, self.phi_level, self.config)
        self.factors = guarded_factors(self.factors, ema * self.factors + (1.0 - ema) * mu_hat, held,
                                       fallback=self.config.guard_action == "fallback")
        self.norm_ratio = (size - self.log_norm_level).exp()
        self.log_norm_level = running_level(self.log_norm_level, size, self.config.guard_ema)
        self.phi_level = running_level(self.phi_level, phi, self.config.guard_ema)
        self.held = held
        self.num_held += held.long()
        self.phi = phi
        self.noise_scale = noise_scale(moments)
        self.num_updates += 1
        return True

    def held_modules(self) -> list[str]:
        """The modules the guard held at the latest statistics step."""
        return [name for name, held in zip(self.module_names, self.held.tolist()) if held]

    def factor(self, module: str) -> float:
        return float(self.factors[self.module_names.index(module)])

    def as_dict(self) -> dict[str, dict[str, float]]:
        """The latest factor, phi and noise scale per module, for logs and plots.

        With the guard on, also ``held`` (1.0 where it kept the factor from rising at the latest
        statistics step) and ``norm_ratio`` (sqrt(A) over its running level before that step); off, the
        record is as it always was.
        """
        return {name: self._module_record(i) for i, name in enumerate(self.module_names)}

    def _module_record(self, i: int) -> dict[str, float]:
        record = {"factor": float(self.factors[i]), "phi": float(self.phi[i]),
                  "noise_scale": float(self.noise_scale[i])}
        if self.config.guard:
            record.update(held=float(self.held[i]), norm_ratio=float(self.norm_ratio[i]))
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "module_names": list(self.module_names),
            "factors": self.factors.clone(),
            "phi": self.phi.clone(),
            "noise_scale": self.noise_scale.clone(),
            "num_updates": self.num_updates,
            "num_rejected": self.num_rejected,
            "guard": {
                "log_norm_level": self.log_norm_level.clone(),
                "phi_level": self.phi_level.clone(),
                "norm_ratio": self.norm_ratio.clone(),
                "held": self.held.clone(),
                "num_held": self.num_held.clone(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["module_names"]) != self.module_names:
            raise ValueError(
                f"AGVM: checkpoint modules {list(state['module_names'])} do not match this model's "
                f"modules {self.module_names}"
            )
        self.factors = state["factors"].clone().double()
        self.phi = state["phi"].clone().double()
        self.noise_scale = state["noise_scale"].clone().double()
        self.num_updates = int(state["num_updates"])
        self.num_rejected = int(state["num_rejected"])
        self._reset_guard()
        guard = state.get("guard")  # absent in checkpoints written before the guard: its levels start afresh
        if guard is not None:
            self.log_norm_level = guard["log_norm_level"].clone().double()
            self.phi_level = guard["phi_level"].clone().double()
            self.norm_ratio = guard["norm_ratio"].clone().double()
            self.held = guard["held"].clone().bool()
            self.num_held = guard["num_held"].clone().long()

