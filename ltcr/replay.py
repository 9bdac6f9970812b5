"""A fixed-size ring buffer of transitions, in numpy, checkpointed whole so that a resumed run samples the same."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ReplayBuffer", "Transitions"]


@dataclass
class Transitions:
    obs: np.ndarray          # [n, obs_dim] float32
    actions: np.ndarray      # [n] int64
    rewards: np.ndarray      # [n] float32
    next_obs: np.ndarray     # [n, obs_dim] float32
    terminated: np.ndarray   # [n] float32: 1 only for a true terminal state (a time-limit cut still bootstraps)

    def __len__(self) -> int:
        return len(self.actions)

    def pack(self) -> torch.Tensor:
        """One float32 row per transition: ``obs | action | reward | next_obs | terminated`` (a message body)."""
        return torch.from_numpy(np.concatenate([
            self.obs, self.actions[:, None].astype(np.float32), self.rewards[:, None], self.next_obs,
            self.terminated[:, None]], axis=1))

    @classmethod
    def unpack(cls, rows: torch.Tensor, obs_dim: int) -> "Transitions":
        rows = rows.detach().cpu().numpy()
        return cls(obs=rows[:, :obs_dim], actions=rows[:, obs_dim].round().astype(np.int64),
                   rewards=rows[:, obs_dim + 1], next_obs=rows[:, obs_dim + 2:2 * obs_dim + 2],
                   terminated=rows[:, 2 * obs_dim + 2])


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int) -> None:
        self.capacity = capacity
        self.storage = Transitions(
            obs=np.zeros((capacity, obs_dim), np.float32), actions=np.zeros(capacity, np.int64),
            rewards=np.zeros(capacity, np.float32), next_obs=np.zeros((capacity, obs_dim), np.float32),
            terminated=np.zeros(capacity, np.float32))
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    def add(self, batch: Transitions) -> None:
        for start in range(0, len(batch), self.capacity):
            chunk = slice(start, min(start + self.capacity, len(batch)))
            index = (self.cursor + np.arange(chunk.stop - chunk.start)) % self.capacity
            for name in ("obs", "actions", "rewards", "next_obs", "terminated"):
                getattr(self.storage, name)[index] = getattr(batch, name)[chunk]
            self.cursor = int((self.cursor + len(index)) % self.capacity)
            self.size = min(self.size + len(index), self.capacity)

    def add_one(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminated: bool) -> None:
        """One transition written in place: called every env step, so no temporary arrays (``add`` is for
        batches, e.g. a peer's message)."""
        storage, i = self.storage, self.cursor
        storage.obs[i] = obs
        storage.actions[i] = action
        storage.rewards[i] = reward
        storage.next_obs[i] = next_obs
        storage.terminated[i] = terminated
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def latest(self, count: int) -> np.ndarray:
        """Indices of the ``count`` most recently added transitions."""
        return (self.cursor - 1 - np.arange(min(count, self.size))) % self.capacity

    def gather(self, index: np.ndarray) -> Transitions:
        return Transitions(**{name: getattr(self.storage, name)[index]
                              for name in ("obs", "actions", "rewards", "next_obs", "terminated")})

    def state_dict(self) -> dict:
        return {"size": self.size, "cursor": self.cursor,
                "storage": self.gather(np.arange(self.size)).__dict__}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.cursor = 0, 0
        self.add(Transitions(**state["storage"]))
        self.size, self.cursor = state["size"], state["cursor"]
