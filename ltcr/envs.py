"""The four gymnasium control tasks LTCR runs on, with the support of their value distributions.

The C51 support ``[v_min, v_max]`` must cover the discounted returns an agent can see. Our defaults assume
``gamma = 0.99`` (returns are bounded by ``max |r| / (1 - gamma) = 100 x max |r|`` for -1/+1 per-step tasks):

- CartPole-v1: +1 per step for at most 500 steps, so discounted values lie in [0, 99.3]: ``[0, 100]``.
- Acrobot-v1 and MountainCar-v0: -1 per step: ``[-100, 0]``.
- LunarLander-v3: shaped rewards plus +-100 for landing or crashing; ``[-150, 150]`` (a choice: wider loses
  resolution per atom, values beyond it are clamped onto the end atoms by the projection).

``solved`` is the usual "solved" threshold of each task, used by the benchmark's steps-to-threshold column.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

__all__ = ["ENVIRONMENTS", "EnvSpec", "Episodes", "derive_seed", "evaluate", "evaluate_batched", "make_eval_envs"]


@dataclass(frozen=True)
class EnvSpec:
    v_min: float
    v_max: float
    solved: float


ENVIRONMENTS: dict[str, EnvSpec] = {
    "CartPole-v1": EnvSpec(v_min=0.0, v_max=100.0, solved=475.0),
    "Acrobot-v1": EnvSpec(v_min=-100.0, v_max=0.0, solved=-100.0),
    "MountainCar-v0": EnvSpec(v_min=-100.0, v_max=0.0, solved=-110.0),
    "LunarLander-v3": EnvSpec(v_min=-150.0, v_max=150.0, solved=200.0),
}


def derive_seed(*keys: int) -> int:
    """A seed that is a pure function of its keys, e.g. (run seed, rank, stream, episode): what makes episodes
    replayable. Callers put a distinct stream number after the rank (0 agent, 1 training episodes, 2 evaluation)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


class Episodes:
    """A training environment whose episodes are reset with known seeds and whose actions are remembered.

    Why: gymnasium environments (Box2D ones in particular) cannot be pickled, but they are deterministic given
    the reset seed and the actions. A checkpoint stores the episode number and the actions taken so far, and
    :meth:`load_state_dict` replays them, so a resumed run continues from the exact same simulator state.
    """

    def __init__(self, name: str, seed: int, rank: int) -> None:
        self.env = gym.make(name)
        self.seed, self.rank = seed, rank
        self.episode = 0
        self._begin()

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.env.observation_space.shape))

    @property
    def n_actions(self) -> int:
        return int(self.env.action_space.n)

    def _begin(self) -> None:
        obs, _ = self.env.reset(seed=derive_seed(self.seed, self.rank, 1, self.episode))
        self.obs = np.asarray(obs, dtype=np.float32)
        self.actions: list[int] = []
        self.episode_return = 0.0

    def step(self, action: int) -> tuple[np.ndarray, float, bool, float | None]:
        """Steps once; returns (next_obs, reward, terminated, finished episode's return or None).

        On the end of an episode the next one starts at once, so ``self.obs`` is always the current state.
        """
        next_obs, reward, terminated, truncated, _ = self.env.step(action)
        next_obs = np.asarray(next_obs, dtype=np.float32)
        self.actions.append(int(action))
        self.episode_return += float(reward)
        finished = None
        if terminated or truncated:
            finished = self.episode_return
            self.episode += 1
            self._begin()
        else:
            self.obs = next_obs
        return next_obs, float(reward), bool(terminated), finished

    def state_dict(self) -> dict:
        return {"episode": self.episode, "actions": list(self.actions), "obs": self.obs.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.episode = state["episode"]
        self._begin()
        for action in state["actions"]:
            self.step(action)
        if not np.array_equal(self.obs, state["obs"]):
            raise RuntimeError(f"replaying episode {self.episode} did not reproduce the checkpointed state: "
                               "the environment is not deterministic given its seed and actions")


def evaluate(env: gym.Env, policy, episodes: int, *seed_keys: int) -> float:
    """Mean undiscounted return of ``policy(obs) -> action`` over ``episodes`` episodes with fixed seeds."""
    total = 0.0
    for episode in range(episodes):
        obs, _ = env.reset(seed=derive_seed(*seed_keys, episode))
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(np.asarray(obs, dtype=np.float32)))
            total += float(reward)
            done = terminated or truncated
    return total / episodes


def make_eval_envs(name: str, episodes: int) -> gym.vector.SyncVectorEnv:
    """One sub-environment per evaluation episode, stepped together by :func:`evaluate_batched`."""
    return gym.vector.SyncVectorEnv([lambda: gym.make(name) for _ in range(episodes)], copy=False)


def evaluate_batched(envs: gym.vector.SyncVectorEnv, policy, *seed_keys: int) -> float:
    """:func:`evaluate` over ``envs.num_envs`` episodes played side by side: ``policy(obs[n, d]) -> actions[n]``
    is one batched forward pass per step instead of one per episode and step.

    Episode ``e`` starts from the seed ``derive_seed(*seed_keys, e)``, as in :func:`evaluate`, so a deterministic
    policy gets the same returns from both. A sub-environment whose episode ended is reset by the vector env on
    its next step (gymnasium's next-step autoreset); what it does after that is not counted.
    """
    n = envs.num_envs
    obs, _ = envs.reset(seed=[derive_seed(*seed_keys, episode) for episode in range(n)])
    returns, running = np.zeros(n), np.ones(n, dtype=bool)
    while running.any():
        obs, rewards, terminated, truncated, _ = envs.step(policy(obs))
        returns += rewards * running
        running &= ~(terminated | truncated)
    return float(returns.mean())
