"""One rank's training loop: act, store, learn, take part in transfer rounds, evaluate, log, checkpoint."""
from __future__ import annotations

import math
import shutil
from collections import deque
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .agent import C51Agent
from .config import LTCRConfig
from .envs import Episodes, derive_seed, evaluate_batched, make_eval_envs
from .logs import METRICS, RunLog, plot_run
from .peers import init_peers
from .transfer import TransferProtocol

__all__ = ["Trainer"]

RECENT_EPISODES = 10


class Trainer:
    """Every rank runs the same number of environment steps, so transfer rounds and evaluations (collective
    calls) happen at the same step on every rank without any extra synchronisation."""

    def __init__(self, config: LTCRConfig, resume: bool = False) -> None:
        torch.set_num_threads(config.train.threads)
        self.config = config
        self.peers = init_peers(config.device)
        rank, world_size = self.peers.rank, self.peers.world_size
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        agent_config = config.agent_for(rank)
        self.episodes = Episodes(config.env, config.seed, rank)
        self.eval_envs = make_eval_envs(config.env, config.train.eval_episodes)
        self.agent = C51Agent(agent_config, self.episodes.obs_dim, self.episodes.n_actions, *config.support,
                              seed=derive_seed(config.seed, rank, 0), device=self.peers.device)
        self.protocol = None
        if world_size > 1 and config.transfer.enabled:
            self.protocol = TransferProtocol(config.transfer, self.peers, self.episodes.obs_dim, config.agent.atoms)
        # rounds start once every agent learns, so all ranks agree on the first round whatever per_agent says
        self.transfer_starts = max(config.agent_for(r).learning_starts for r in range(world_size))
        self.step = 0
        self.recent_returns: deque[float] = deque(maxlen=RECENT_EPISODES)
        self.window = {"distill_loss": 0.0, "distill_steps": 0, "bytes_per_round": math.nan, "taught": 0.0,
                       "rounds": 0}
        resume_step = self._load_latest() if resume else None
        self.log = None
        if rank == 0:
            with open(self.output_dir / "config.yaml", "w") as f:
                yaml.safe_dump(config.to_dict(), f, sort_keys=False)
            self.log = RunLog(self.output_dir, resume_step)

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    def train(self) -> None:
        config, agent = self.config, self.agent
        bar = tqdm(total=config.train.steps, initial=self.step, desc=f"LTCR {config.env}", unit="step",
                   disable=self.peers.rank != 0 or not config.train.progress)
        while self.step < config.train.steps:
            self._env_step()
            self.step += 1
            if self.protocol and self.step >= self.transfer_starts and self.step % config.transfer.interval == 0:
                report = self.protocol.run_round(agent, self._recent_return())
                self.window["bytes_per_round"] = report.bytes_sent
                self.window["taught"] += report.states_taught / (self.peers.world_size * config.transfer.batch)
                self.window["rounds"] += 1
            if self.step % config.train.eval_interval == 0 or self.step == config.train.steps:
                team_return = self._evaluate_and_log()
                bar.set_postfix(team_return=f"{team_return:.1f}", eps=f"{agent.epsilon(self.step):.2f}")
            if self.step % config.train.checkpoint_interval == 0 or self.step == config.train.steps:
                self._save()
            bar.update(1)
        bar.close()
        if self.log is not None:
            self.log.close()
            plot_run(self.output_dir)
        self.peers.close()

    def _env_step(self) -> None:
        agent, obs = self.agent, self.episodes.obs
        action = agent.act(obs, self.step)
        next_obs, reward, terminated, finished = self.episodes.step(action)
        agent.replay.add_one(obs, action, reward, next_obs, terminated)
        if finished is not None:
            self.recent_returns.append(finished)
        if self.step >= agent.config.learning_starts and self.step % agent.config.train_every == 0:
            stats = agent.train_step(self.config.transfer.distill_weight)
            if "distill_loss" in stats:
                self.window["distill_loss"] += stats["distill_loss"]
                self.window["distill_steps"] += 1

    def _recent_return(self) -> float:
        return sum(self.recent_returns) / len(self.recent_returns) if self.recent_returns else -math.inf

    def _evaluate_and_log(self) -> float:
        """Greedy evaluation of every agent; rank 0 logs the table. Returns the team mean evaluation return."""
        window, rank = self.window, self.peers.rank
        taught = window["taught"] / window["rounds"] if window["rounds"] and self.config.transfer.distill else math.nan
        eval_return = evaluate_batched(self.eval_envs, self.agent.greedy_actions, self.config.seed, rank, 2, self.step)
        values = [eval_return, self._recent_return() if self.recent_returns else math.nan,
                  window["distill_loss"] / window["distill_steps"] if window["distill_steps"] else math.nan,
                  window["bytes_per_round"], float(self.peers.bytes_sent), self.agent.epsilon(self.step),
                  taught]
        assert len(values) == len(METRICS)
        table = self.peers.gather_metrics(values).cpu().tolist()
        window.update(distill_loss=0.0, distill_steps=0, taught=0.0, rounds=0)
        if self.log is not None:
            self.log.write(self.step, table)
        return sum(row[0] for row in table) / len(table)

    def _save(self) -> None:
        folder = self.checkpoint_root / f"step_{self.step:09d}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "world_size": self.peers.world_size, "agent": self.agent.state_dict(),
                 "episodes": self.episodes.state_dict(), "recent_returns": list(self.recent_returns),
                 "window": dict(self.window), "bytes_sent": self.peers.bytes_sent}
        torch.save(state, folder / f"rank{self.peers.rank}.pt")
        self.peers.barrier()
        if self.peers.rank == 0:  # `latest` names a checkpoint only once every rank has written its part
            (self.checkpoint_root / "latest").write_text(folder.name)
            for old in sorted(self.checkpoint_root.glob("step_*"))[:-self.config.train.keep_checkpoints]:
                shutil.rmtree(old)
        self.peers.barrier()

    def _load_latest(self) -> int | None:
        latest = self.checkpoint_root / "latest"
        if not latest.is_file():
            return None
        path = self.checkpoint_root / latest.read_text().strip() / f"rank{self.peers.rank}.pt"
        state = torch.load(path, weights_only=False)
        if state["world_size"] != self.peers.world_size:
            raise ValueError(f"{path}: saved by a team of {state['world_size']} agents, resumed with "
                             f"{self.peers.world_size}; a team resumes with the same number of ranks")
        self.agent.load_state_dict(state["agent"])
        self.episodes.load_state_dict(state["episodes"])
        self.recent_returns.extend(state["recent_returns"])
        self.window.update(state["window"])
        self.peers.bytes_sent = state["bytes_sent"]
        self.step = state["step"]
        return self.step
