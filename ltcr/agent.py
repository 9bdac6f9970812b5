"""One C51 learner: online and target networks, epsilon-greedy acting, replay, and an optional distillation term."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .c51 import CategoricalQNetwork, categorical_cross_entropy, distribution_entropy, project_distribution
from .config import AgentConfig
from .replay import ReplayBuffer, Transitions

__all__ = ["C51Agent", "DistillationTargets", "Outlook"]


@dataclass
class DistillationTargets:
    """What this agent's teachers sent in the last round: for each state, the teacher's greedy action and the
    teacher's distribution of that action's return. Kept fixed until the next round replaces it."""

    states: torch.Tensor     # [n, obs_dim]
    actions: torch.Tensor    # [n] int64
    probs: torch.Tensor      # [n, atoms]

    def __len__(self) -> int:
        return len(self.actions)


@dataclass
class Outlook:
    """An agent's view of a batch of states: its greedy action, that action's distribution, and its entropy."""

    actions: torch.Tensor    # [n]
    probs: torch.Tensor      # [n, atoms]
    entropy: torch.Tensor    # [n]


class C51Agent:
    def __init__(self, config: AgentConfig, obs_dim: int, n_actions: int, v_min: float, v_max: float,
                 seed: int, device: torch.device) -> None:
        self.config, self.n_actions, self.device = config, n_actions, device
        torch.manual_seed(seed)
        support = torch.linspace(v_min, v_max, config.atoms)
        self.online = CategoricalQNetwork(obs_dim, n_actions, support, config.hidden).to(device)
        self.target = CategoricalQNetwork(obs_dim, n_actions, support, config.hidden).to(device)
        self.target.load_state_dict(self.online.state_dict())
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=config.lr, eps=config.adam_eps)
        self.replay = ReplayBuffer(config.buffer_size, obs_dim)
        self.rng = np.random.default_rng(seed)
        self.distillation: Optional[DistillationTargets] = None
        self.updates = 0
        self._online_params = list(self.online.parameters())
        self._numpy_pointers: list[int] = []
        self._numpy_cache: list[tuple[np.ndarray, np.ndarray]] = []

    def epsilon(self, step: int) -> float:
        """Linear from ``eps_start`` to ``eps_final`` over ``eps_decay_steps`` env steps, then constant
        (CleanRL's ``linear_schedule`` with ``duration = exploration_fraction x total_timesteps``)."""
        c = self.config
        return c.eps_start + (c.eps_final - c.eps_start) * min(1.0, step / c.eps_decay_steps)

    @torch.inference_mode()
    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions for a batch of observations ``[n, obs_dim]``: one forward pass for all of them, which
        is what makes evaluating several episodes at once cheap."""
        return self.online.greedy(torch.from_numpy(np.asarray(obs, dtype=np.float32)).to(self.device)).cpu().numpy()

    def greedy_action(self, obs: np.ndarray) -> int:
        """The greedy action for one observation, as acting needs it every env step. On CPU the same forward
        pass runs in numpy on views of the network's weights: at batch 1 torch's per-operation dispatch dominates,
        and numpy takes 15 us per call where torch takes 40 us (a 120-84 network, benchmarks/ltcr_agent_speed.py)."""
        if self.device.type != "cpu":
            return int(self.greedy_actions(obs[None])[0])
        *hidden, (weight, bias) = self._numpy_layers()
        x = np.asarray(obs, dtype=np.float32)
        for w, b in hidden:
            x = np.maximum(w @ x + b, 0.0)
        logits = (weight @ x + bias).reshape(self.n_actions, -1)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return int(((probs @ self._support) / probs.sum(1)).argmax())

    def _numpy_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """numpy views (shared memory, no copy) of the online network's Linear weights and biases. Optimizer steps
        and ``load_state_dict`` write the parameters in place, so the views stay current; they are rebuilt only if
        a parameter's storage moved."""
        pointers = [p.data_ptr() for p in self._online_params]
        if pointers != self._numpy_pointers:
            self._numpy_pointers = pointers
            self._numpy_cache = [(layer.weight.detach().numpy(), layer.bias.detach().numpy())
                                 for layer in self.online.body if isinstance(layer, torch.nn.Linear)]
            self._support = self.online.support.numpy()
        return self._numpy_cache

    def act(self, obs: np.ndarray, step: int) -> int:
        if self.rng.random() < self.epsilon(step):
            return int(self.rng.integers(self.n_actions))
        return self.greedy_action(obs)

    @torch.no_grad()
    def outlook(self, states: torch.Tensor) -> Outlook:
        log_probs = self.online(states.to(self.device))
        actions = self.online.q_values(log_probs).argmax(1)
        probs = log_probs.exp()[torch.arange(len(actions), device=self.device), actions]
        return Outlook(actions=actions, probs=probs, entropy=distribution_entropy(probs))

    def td_loss(self, batch: Optional[Transitions] = None) -> torch.Tensor:
        """The C51 loss on ``batch``, by default ``batch_size`` transitions drawn uniformly (with replacement,
        as CleanRL's buffer does) from the replay buffer."""
        if batch is None:
            batch = self.replay.gather(self.rng.integers(len(self.replay), size=self.config.batch_size))
        obs, next_obs, actions, rewards, terminated = (
            torch.as_tensor(x, device=self.device)
            for x in (batch.obs, batch.next_obs, batch.actions, batch.rewards, batch.terminated))
        rows = torch.arange(len(actions), device=self.device)
        with torch.no_grad():
            next_probs = self.target.logits(next_obs).softmax(-1)
            next_actions = (next_probs @ self.target.support).argmax(1)  # the target network's greedy action
            target = project_distribution(next_probs[rows, next_actions], rewards, terminated, self.config.gamma,
                                          self.online.support)
        # log-softmax of the taken action's logits only: the other actions' atoms do not enter the loss
        return categorical_cross_entropy(target, self.online.logits(obs)[rows, actions].log_softmax(-1))

    def distill_loss(self) -> torch.Tensor:
        """Cross-entropy from the teachers' distributions to ours, for the teachers' greedy actions."""
        targets = self.distillation
        index = torch.as_tensor(self.rng.integers(len(targets), size=min(self.config.batch_size, len(targets))))
        log_probs = self.online(targets.states[index].to(self.device))
        chosen = log_probs[torch.arange(len(index), device=self.device), targets.actions[index].to(self.device)]
        return categorical_cross_entropy(targets.probs[index].to(self.device), chosen)

    def train_step(self, distill_weight: float) -> dict[str, float]:
        """One gradient step on the C51 loss, plus ``distill_weight`` x the distillation loss when a teacher spoke."""
        loss = td = self.td_loss()
        stats = {"td_loss": td.item()}
        if self.distillation is not None and len(self.distillation) and distill_weight > 0:
            distill = self.distill_loss()
            loss = loss + distill_weight * distill
            stats["distill_loss"] = distill.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.online.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.config.target_update == 0:
            self.target.load_state_dict(self.online.state_dict())
        return stats

    def state_dict(self) -> dict:
        return {"online": self.online.state_dict(), "target": self.target.state_dict(),
                "optimizer": self.optimizer.state_dict(), "replay": self.replay.state_dict(),
                "rng": self.rng.bit_generator.state, "distillation": self.distillation, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.replay.load_state_dict(state["replay"])
        self.rng.bit_generator.state = state["rng"]
        self.distillation = state["distillation"]
        self.updates = state["updates"]
