"""The modulation rule of AGVM: variance proxies in, smoothed learning-rate factors out.

    mu_hat_i = sqrt(clamp((phi_anchor + eps) / (phi_i + eps), clamp_min, clamp_max))
    mu_i    <- ema * mu_i + (1 - ema) * mu_hat_i          (mu_i starts at 1)

The anchor's factor is 1 by construction. The state is a handful of floats, so it is checkpointed
whole (the official code loses it on resume and restarts every factor at 1).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .config import AGVMConfig
from .estimator import GradientMoments, noise_scale, variance_proxy

__all__ = ["target_factors", "GradientVarianceModulator"]


def target_factors(phi: torch.Tensor, anchor_index: int, config: AGVMConfig) -> torch.Tensor:
    """Unsmoothed factors mu_hat for one measurement of phi (one entry per module)."""
    ratio = (phi[anchor_index] + config.eps) / (phi + config.eps)
    return ratio.clamp(config.clamp_min, config.clamp_max).sqrt()


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
        mu_hat = target_factors(phi, self.anchor_index, self.config)
        ema = self.config.ema
        self.factors = ema * self.factors + (1.0 - ema) * mu_hat
        self.phi = phi
        self.noise_scale = noise_scale(moments)
        self.num_updates += 1
        return True

    def factor(self, module: str) -> float:
        return float(self.factors[self.module_names.index(module)])

    def as_dict(self) -> dict[str, dict[str, float]]:
        """The latest factor, phi and noise scale per module, for logs and plots."""
        return {
            name: {
                "factor": float(self.factors[i]),
                "phi": float(self.phi[i]),
                "noise_scale": float(self.noise_scale[i]),
            }
            for i, name in enumerate(self.module_names)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "module_names": list(self.module_names),
            "factors": self.factors.clone(),
            "phi": self.phi.clone(),
            "noise_scale": self.noise_scale.clone(),
            "num_updates": self.num_updates,
            "num_rejected": self.num_rejected,
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

