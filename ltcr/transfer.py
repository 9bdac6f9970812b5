"""The LTCR communication protocol: experience reuse and value distillation among peers, within a byte budget.

Our design (the paper's abstract gives no protocol details). Every ``interval`` environment steps all agents
take part in one synchronous round of at most three all-gathers:

1. **Experience.** Each agent samples ``batch`` of the transitions it collected since the last round and sends
   them (``obs | action | reward | next_obs | terminated``; only ``obs`` when experience sharing is off but
   distillation is on). With ``share_experience`` every agent adds its peers' transitions to its replay buffer.
   The observations of all messages form the round's *shared batch* of ``N x batch`` states.
2. **Confidence.** Each agent evaluates its online network on the shared batch and sends one score per state:
   with ``teacher: confidence`` the entropy of the distribution of its greedy action (a peaked distribution =
   a confident agent); with ``teacher: return`` one number, minus its mean recent episode return (the best
   recent performer teaches every state). The teacher of a state is the agent with the lowest score (ties:
   lowest rank), so agents with different experience teach different parts of the state space.
3. **Distributions.** Each teacher sends, for the states it teaches, only its greedy action and that action's
   distribution (``1 + atoms`` floats per state): not all ``n_actions`` distributions, and nothing for the
   states it does not teach. Every student then distils, for the states a *peer* teaches, the teacher's
   distribution of the teacher's action: loss ``-sum_z p_teacher(z|s,a_T) log p_student(z|s,a_T)`` added
   with weight ``distill_weight`` to every gradient step until the next round.

Bytes: each all-gather of an ``m``-byte message counts ``(N - 1) m`` sent bytes per agent. Parts 1 and 2 have a
fixed size; a budget smaller than them is refused at start-up. Part 3 is trimmed to fit: a teacher sends at
most ``max_rows`` states (its most confident ones), so a round never exceeds ``budget_bytes``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .agent import C51Agent, DistillationTargets
from .config import TransferConfig
from .peers import PeerGroup
from .replay import Transitions

__all__ = ["RoundReport", "TransferProtocol"]

FLOAT_BYTES = 4


@dataclass
class RoundReport:
    bytes_sent: int
    transitions_received: int
    states_taught: int       # states this agent taught its peers
    states_learned: int      # states this agent received a teacher's distribution for
    states_trimmed: int      # states dropped (by all teachers) to stay within the budget


class TransferProtocol:
    def __init__(self, config: TransferConfig, peers: PeerGroup, obs_dim: int, atoms: int) -> None:
        self.config, self.peers, self.obs_dim = config, peers, obs_dim
        n_peers, shared_states = peers.world_size - 1, peers.world_size * config.batch
        row = (2 * obs_dim + 3) if config.share_experience else obs_dim
        self.experience_bytes = config.batch * row * FLOAT_BYTES
        score_floats = (shared_states if config.teacher == "confidence" else 1) if config.distill else 0
        self.score_bytes = score_floats * FLOAT_BYTES
        self.row_bytes = (1 + atoms) * FLOAT_BYTES
        fixed = n_peers * (self.experience_bytes + self.score_bytes)
        if fixed > config.budget_bytes:
            raise ValueError(
                f"transfer.budget_bytes={config.budget_bytes}: a round with {peers.world_size} agents needs at "
                f"least {fixed} bytes per agent before any distribution is sent ({n_peers} peers x "
                f"({self.experience_bytes} experience + {self.score_bytes} confidence)); raise the budget or lower "
                "transfer.batch")
        per_peer = config.budget_bytes // n_peers - self.experience_bytes - self.score_bytes
        self.max_rows = per_peer // self.row_bytes if config.distill else 0

    def run_round(self, agent: C51Agent, recent_return: float) -> RoundReport:
        """One synchronous round; every rank must call it at the same step."""
        config, peers = self.config, self.peers
        start = peers.bytes_sent
        recent = agent.replay.latest(config.interval)
        own = agent.replay.gather(recent[agent.rng.choice(len(recent), size=config.batch, replace=False)])
        message = own.pack() if config.share_experience else torch.from_numpy(own.obs)
        received = peers.exchange(message).cpu()
        if config.share_experience:
            for rank in peers.peers:
                agent.replay.add(Transitions.unpack(received[rank], self.obs_dim))
        report = RoundReport(0, len(peers.peers) * config.batch if config.share_experience else 0, 0, 0, 0)
        if config.distill:
            self._distill(agent, received[..., :self.obs_dim].reshape(-1, self.obs_dim), recent_return, report)
        report.bytes_sent = peers.bytes_sent - start
        return report

    def _distill(self, agent: C51Agent, states: torch.Tensor, recent_return: float, report: RoundReport) -> None:
        peers = self.peers
        outlook = agent.outlook(states)
        if self.config.teacher == "confidence":
            score = outlook.entropy.float()
        else:
            score = torch.tensor([-recent_return], dtype=torch.float32)
        scores = peers.exchange(score).cpu().expand(peers.world_size, len(states))
        teacher = scores.argmin(0)
        kept = [self._kept_states(teacher, scores, rank) for rank in range(peers.world_size)]
        report.states_trimmed = int(sum((teacher == r).sum() - len(k) for r, k in enumerate(kept)))
        report.states_taught = len(kept[peers.rank])
        rows = max(len(k) for k in kept)
        agent.distillation = None
        if rows == 0:
            return
        message = torch.zeros(rows, 1 + outlook.probs.shape[1])
        mine = kept[peers.rank]
        message[:len(mine), 0] = outlook.actions[mine].cpu().float()
        message[:len(mine), 1:] = outlook.probs[mine].cpu()
        taught = peers.exchange(message).cpu()
        lessons = [(kept[t], taught[t, :len(kept[t])]) for t in peers.peers if len(kept[t])]
        if lessons:
            agent.distillation = DistillationTargets(
                states=torch.cat([states[index] for index, _ in lessons]),
                actions=torch.cat([rows_[:, 0].round().long() for _, rows_ in lessons]),
                probs=torch.cat([rows_[:, 1:] for _, rows_ in lessons]))
            report.states_learned = len(agent.distillation)

    def _kept_states(self, teacher: torch.Tensor, scores: torch.Tensor, rank: int) -> torch.Tensor:
        """The states ``rank`` teaches this round: all it is best at, or its ``max_rows`` most confident."""
        index = (teacher == rank).nonzero().flatten()
        if len(index) > self.max_rows:
            index = index[torch.argsort(scores[rank, index], stable=True)[:self.max_rows]].sort().values
        return index
