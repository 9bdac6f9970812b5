"""Interleaved timing of benchmark variants, and paired ratios with confidence intervals.

Machine load drifts during a run (other processes, clocks, heat). Running every variant once per
round, in an order that rotates from round to round, lets the drift hit all variants alike; the
ratio of two variants' times in the same round cancels most of it, and the spread of these paired
ratios over the rounds gives the confidence interval. Shared by ``agvm_overhead.py`` and
``throughput.py``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

__all__ = ["Ratio", "interleaved_times", "paired_ratio"]

Inputs = TypeVar("Inputs")


@dataclass(frozen=True)
class Ratio:
    """Mean of paired ratios and the half-width of its 95% confidence interval (normal approximation;
    nan with fewer than two pairs)."""

    mean: float
    half_width: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} +- {self.half_width:.3f}"


def interleaved_times(
    steps: Mapping[str, Callable[[Inputs], object]],
    inputs: Callable[[int], Inputs],
    rounds: int,
    warmup: int,
    sync: Callable[[], None],
) -> dict[str, list[float]]:
    """Seconds each variant's step took in each of ``rounds`` rounds after ``warmup`` untimed ones.

    Every round draws one ``inputs(round)`` (outside the timed region) and runs each variant's step
    on it; ``sync`` (a device synchronisation, a barrier) ends each timed region.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        batch = inputs(round_index)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name](batch)
            sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
    """Mean of ``numerators[i] / denominators[i]`` over the rounds, with its 95% confidence interval."""
    pairs = [a / b for a, b in zip(numerators, denominators, strict=True)]
    half_width = 1.96 * statistics.stdev(pairs) / math.sqrt(len(pairs)) if len(pairs) > 1 else math.nan
    return Ratio(statistics.mean(pairs), half_width)
