"""AGVM hyper-parameters, validated once so a typo fails at start-up, not at iteration 1000."""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import Field, model_validator

from ..config_checks import Count, Expected, PositiveCount, build, invalid, section

__all__ = ["AGVMConfig"]


@section(label="AGVM config")
class AGVMConfig:
    """Settings of the Adaptive Gradient Variance Modulator (Xue et al., NeurIPS 2022).

    Defaults are those of the paper and its official configs: the backbone is the anchor, statistics
    every 10 iterations, factor sqrt(clamp(phi_anchor / phi_i, 0.5, 10)), EMA 0.97.

    Args:
        anchor: module whose variance the others are aligned to; its factor is always 1.
        interval: iterations between two variance measurements (tau in the paper).
        ema: smoothing of the factor, mu <- ema * mu + (1 - ema) * mu_hat. 0 disables smoothing;
            the paper's ablation shows training diverging without it.
        clamp_min / clamp_max: bounds of phi_anchor / phi_i before the square root.
        start_iter: first iteration at which statistics are taken and factors applied.
        stop_iter: last such iteration (None: never stop).
        eps: added to numerator and denominator of the variance ratio, as in the official code.
        precondition: measure variance of AdamW-preconditioned gradients g / (sqrt(v) + eps_adam),
            as the paper does for AdamW; only valid with an optimizer that keeps ``exp_avg_sq``.
        enabled: False turns AGVM into a transparent pass-through (the baseline of a comparison).
        guard: the divergence guard (docs/agvm.md, "The divergence guard"): a module's factor may not rise
            while its gradient norm stands far above its running level, since a large, coherent gradient
            (a loss spike) has a low phi that AGVM would otherwise read as low variance. Off by default:
            no run has shown it helps yet.
        guard_ratio: the guard holds a module while sqrt(A) > guard_ratio x its running level
            (A = mean micro-batch squared gradient norm of the statistics step; the level is a geometric
            mean, an EMA of log sqrt(A), so that one huge spike step does not lift it).
        guard_ema: smoothing of the running levels over statistics steps, level <- e * level + (1 - e) * x.
        guard_phi_drop: None, or also hold a module while phi < guard_phi_drop x its running phi level
            (an abrupt fall of phi).
        guard_action: what holding a module does to its factor. ``hold``: it may fall but not rise.
            ``fallback``: as ``hold``, and no higher than 1, so the module trains at the scheduled lr (or
            lower) until its gradient is back near its level; in a measured spike, holding factors of 1.3
            did not stop the divergence that they had started (docs/agvm.md).
    """

    anchor: Annotated[str, Field(min_length=1), Expected("the non-empty name of a module")] = "backbone"
    interval: PositiveCount = 10
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.97
    clamp_min: Annotated[float, Field(gt=0)] = 0.5
    clamp_max: float = 10.0
    start_iter: Count = 0
    stop_iter: Optional[int] = None
    eps: Annotated[float, Field(ge=0)] = 1e-6
    precondition: bool = False
    enabled: bool = True
    guard: bool = False
    guard_ratio: Annotated[float, Field(gt=1)] = 2.0
    guard_ema: Annotated[float, Field(ge=0, lt=1)] = 0.9
    guard_phi_drop: Optional[Annotated[float, Field(gt=0, lt=1)]] = None
    guard_action: Literal["hold", "fallback"] = "hold"

    @model_validator(mode="after")
    def _check_order(self) -> "AGVMConfig":
        if self.clamp_max < self.clamp_min:
            raise invalid(f"expected a number >= clamp_min ({self.clamp_min})", clamp_max=self.clamp_max)
        if self.stop_iter is not None and self.stop_iter < self.start_iter:
            raise invalid(f"expected None or an integer >= start_iter ({self.start_iter})", stop_iter=self.stop_iter)
        return self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AGVMConfig":
        """Builds a config from a mapping (a YAML section); an unknown key lists the valid ones."""
        return build(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def is_active(self, iteration: int) -> bool:
        """Whether factors other than 1 may be applied at this (0-based) iteration."""
        if not self.enabled or iteration < self.start_iter:
            return False
        return self.stop_iter is None or iteration <= self.stop_iter

    def is_stats_iter(self, iteration: int) -> bool:
        """Whether gradient statistics are measured at this (0-based) iteration."""
        return self.is_active(iteration) and (iteration - self.start_iter) % self.interval == 0

