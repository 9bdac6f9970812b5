"""Per-module gradient-variance proxy from two scalars per module.

The official AGVM splits the data-parallel ranks into halves A and B and takes
phi = 1 - cos(G_A, G_B). That needs a full-gradient exchange. Here the same quantity is estimated
from two moments of the M micro-batch gradients g_1..g_M of one optimizer step
(M = data-parallel ranks x gradient-accumulation steps), per module:

    A = mean_k ||g_k||^2          (each rank sums the norms of its own micro-batch gradients)
    B = ||mean_k g_k||^2          (the norm of the reduced gradient the optimizer steps with)

For iid g_k with mean G and covariance Sigma, E[A] = ||G||^2 + tr(Sigma) and
E[B] = ||G||^2 + tr(Sigma) / M, so

    tr(Sigma) ~ M (A - B) / (M - 1),     ||G||^2 ~ (M B - A) / (M - 1)

and the expectation of the official estimator is

    phi = 1 - E[cos(G_A, G_B)] ~ 2 (A - B) / ((M - 2) B + A).

Both are unbiased for the same target; this one has a lower spread (it uses all M(M-1)/2 pairs, not
one split) and costs one all-reduce of 2 floats per module. tr(Sigma) / ||G||^2 is the gradient
noise scale B_simple of McCandlish et al. (2018), logged per module as a by-product.

Everything here is pure: tensors in, tensors out, no distributed state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GradientMoments", "variance_proxy", "noise_scale", "gradient_norm", "moments_from_gradients"]


@dataclass(frozen=True)
class GradientMoments:
    """The two per-module moments of one optimizer step.

    Attributes:
        mean_sq_norm: A, shape (num_modules,), mean over micro-batches of ||g_k||^2.
        sq_norm_of_mean: B, shape (num_modules,), ||mean_k g_k||^2.
        num_samples: M, the number of micro-batch gradients averaged into the step.
    """

    mean_sq_norm: torch.Tensor
    sq_norm_of_mean: torch.Tensor
    num_samples: int

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(
                f"variance needs at least 2 micro-batch gradients per step, got num_samples={self.num_samples}"
            )
        if self.mean_sq_norm.shape != self.sq_norm_of_mean.shape:
            raise ValueError(
                f"A and B must have the same shape, got {tuple(self.mean_sq_norm.shape)} "
                f"and {tuple(self.sq_norm_of_mean.shape)}"
            )

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.mean_sq_norm).all() and torch.isfinite(self.sq_norm_of_mean).all())


def variance_proxy(moments: GradientMoments) -> torch.Tensor:
    """Expected 1 - cos between the gradients of two random halves of the batch, per module.

    A module with no gradient signal (A = 0) gets phi = 0. Sampling noise can make A < B by a
    hair; phi is clamped at 0, since a negative variance is meaningless.
    """
    a, b, m = moments.mean_sq_norm.double(), moments.sq_norm_of_mean.double(), moments.num_samples
    denominator = (m - 2) * b + a
    phi = torch.where(denominator > 0, 2 * (a - b) / denominator.clamp_min(1e-300), torch.zeros_like(a))
    return phi.clamp(0.0, 2.0)


def noise_scale(moments: GradientMoments) -> torch.Tensor:
    """tr(Sigma) / ||G||^2 per module (B_simple, McCandlish et al. 2018); inf where ||G||^2 <= 0."""
    a, b, m = moments.mean_sq_norm.double(), moments.sq_norm_of_mean.double(), moments.num_samples
    trace = (m * (a - b) / (m - 1)).clamp_min(0.0)
    signal = (m * b - a) / (m - 1)
    return torch.where(signal > 0, trace / signal.clamp_min(1e-300), torch.full_like(a, float("inf")))


def gradient_norm(moments: GradientMoments) -> torch.Tensor:
    """sqrt(A) per module: the RMS norm of the micro-batch gradients, the divergence guard's size signal.

    A rather than B: A = ||G||^2 + tr(Sigma) is a mean over M norms, steady from step to step, and it grows
    with the gradient whether the growth is coherent (a spike, where phi falls) or not; B of a noisy
    module is mostly sampling noise of size tr(Sigma) / M. Unclipped and unscaled, as A is.
    """
    return moments.mean_sq_norm.double().clamp_min(0.0).sqrt()


def moments_from_gradients(gradients: torch.Tensor) -> tuple[float, float]:
    """Reference (A, B) of one module from its stacked micro-batch gradients, shape (M, ...).

    Used by tests and benchmarks as the brute-force ground truth of the distributed estimator.
    """
    flat = gradients.reshape(gradients.shape[0], -1).double()
    return float(flat.square().sum(dim=1).mean()), float(flat.mean(dim=0).square().sum())
