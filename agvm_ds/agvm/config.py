"""AGVM hyper-parameters, validated once so a typo fails at start-up, not at iteration 1000."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..config_checks import reject_unknown_keys

__all__ = ["AGVMConfig"]


@dataclass(frozen=True)
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
    """

    anchor: str = "backbone"
    interval: int = 10
    ema: float = 0.97
    clamp_min: float = 0.5
    clamp_max: float = 10.0
    start_iter: int = 0
    stop_iter: Optional[int] = None
    eps: float = 1e-6
    precondition: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"AGVM config: {key}={getattr(self, key)!r} is invalid: {why}")

        if not isinstance(self.anchor, str) or not self.anchor:
            raise bad("anchor", "expected the non-empty name of a module")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval < 1:
            raise bad("interval", "expected an integer >= 1")
        if not _is_real(self.ema) or not 0.0 <= self.ema < 1.0:
            raise bad("ema", "expected a number in [0, 1)")
        if not _is_real(self.clamp_min) or self.clamp_min <= 0:
            raise bad("clamp_min", "expected a number > 0")
        if not _is_real(self.clamp_max) or self.clamp_max < self.clamp_min:
            raise bad("clamp_max", f"expected a number >= clamp_min ({self.clamp_min})")
        if not isinstance(self.start_iter, int) or isinstance(self.start_iter, bool) or self.start_iter < 0:
            raise bad("start_iter", "expected an integer >= 0")
        if self.stop_iter is not None and (
            not isinstance(self.stop_iter, int) or isinstance(self.stop_iter, bool) or self.stop_iter < self.start_iter
        ):
            raise bad("stop_iter", f"expected None or an integer >= start_iter ({self.start_iter})")
        if not _is_real(self.eps) or self.eps < 0:
            raise bad("eps", "expected a number >= 0")
        if not isinstance(self.precondition, bool):
            raise bad("precondition", "expected true or false")
        if not isinstance(self.enabled, bool):
            raise bad("enabled", "expected true or false")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AGVMConfig":
        """Builds a config from a mapping (a YAML section); an unknown key lists the valid ones."""
        reject_unknown_keys(cls, values, "AGVM config")
        return cls(**dict(values))

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


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
