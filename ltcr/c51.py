"""Categorical DQN (C51, Bellemare et al. 2017): the value distribution network, its Bellman projection and losses.

LTCR distils these distributions rather than Q-values: they live on a fixed, bounded support, so a teacher's
distribution is a valid target for any student with the same support, however differently scaled their
networks' raw outputs are.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CategoricalQNetwork", "project_distribution", "categorical_cross_entropy", "distribution_entropy"]


class CategoricalQNetwork(nn.Module):
    """An MLP from an observation to ``n_actions`` categorical distributions over the ``support`` atoms."""

    def __init__(self, obs_dim: int, n_actions: int, support: torch.Tensor, hidden: Sequence[int] = (128, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, n_actions * support.numel()))
        self.body = nn.Sequential(*layers)
        self.n_actions = n_actions
        self.register_buffer("support", support.clone())

    def logits(self, obs: torch.Tensor) -> torch.Tensor:
        """Unnormalised log-probabilities, shape ``[batch, n_actions, atoms]``."""
        return self.body(obs).view(obs.shape[0], self.n_actions, self.support.numel())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities, shape ``[batch, n_actions, atoms]``."""
        return F.log_softmax(self.logits(obs), dim=-1)

    def greedy(self, obs: torch.Tensor) -> torch.Tensor:
        """Greedy actions ``[batch]``: the forward pass as plain tensor calls, without the per-layer module
        dispatch that dominates an MLP this small when it acts one env step at a time."""
        x = obs
        for layer in self.body:  # Linear, ReLU, ..., Linear
            x = F.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else torch.relu_(x)
        probs = x.view(obs.shape[0], self.n_actions, self.support.numel()).softmax(-1)
        return (probs @ self.support).argmax(1)

    def q_values(self, log_probs: torch.Tensor) -> torch.Tensor:
        return (log_probs.exp() * self.support).sum(-1)


def project_distribution(next_probs: torch.Tensor, rewards: torch.Tensor, terminated: torch.Tensor,
                         gamma: float, support: torch.Tensor) -> torch.Tensor:
    """Projects the target distribution of ``r + gamma (1 - terminated) Z'`` back onto ``support``.

    Each shifted atom ``Tz_j`` (clamped into ``[v_min, v_max]``) gives its probability to its two neighbouring
    atoms in proportion to closeness (Algorithm 1 of the C51 paper); an atom that lands exactly on a support
    point gives it everything.
    """
    v_min, v_max, atoms = float(support[0]), float(support[-1]), support.numel()
    delta = (v_max - v_min) / (atoms - 1)
    position = torch.addcmul(rewards[:, None], (gamma * (1.0 - terminated))[:, None], support[None, :])
    position = position.clamp_(v_min, v_max).sub_(v_min).div_(delta)  # in units of atoms, in [0, atoms - 1]
    lower = position.floor()
    upper_share = position - lower  # 0 on an atom: all of the mass stays on `lower` (CleanRL's l == u case)
    lower_index = lower.long()
    upper_index = (lower_index + 1).clamp_(max=atoms - 1)  # past the last atom only with upper_share = 0
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(1, lower_index, next_probs - next_probs * upper_share)
    projected.scatter_add_(1, upper_index, next_probs * upper_share)
    return projected


def categorical_cross_entropy(target_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_z p(z) log q(z)``: the C51 loss and the distillation loss alike."""
    return -(target_probs * log_probs).sum(-1).mean()


def distribution_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the last (atom) dimension; low entropy = a confident value estimate."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)
