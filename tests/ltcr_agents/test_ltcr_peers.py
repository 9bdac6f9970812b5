"""LTCR's transfer round on 3 real gloo ranks: message sizes, byte budget, and what each agent receives.

Each rank fills its replay buffer with transitions that encode their origin (obs[0] = 1000 x rank + index), runs
the protocol, and returns what arrived; the test rebuilds every rank's network from the returned weights and
checks the content: peers' transitions from their last ``interval`` steps, and the distributions of the most
confident peer (lowest entropy of its greedy action's distribution) for exactly the states that peer teaches.
"""
import numpy as np
import pytest
import torch
from distributed import run_ranks

from ltcr.agent import C51Agent
from ltcr.config import AgentConfig, TransferConfig
from ltcr.peers import PeerGroup, init_peers
from ltcr.transfer import TransferProtocol

OBS_DIM, ATOMS, BATCH, INTERVAL, WORLD = 3, 51, 8, 20, 3
EXPERIENCE_BYTES = BATCH * (2 * OBS_DIM + 3) * 4
SCORE_BYTES = WORLD * BATCH * 4
ROW_BYTES = (1 + ATOMS) * 4
TIGHT_ROWS = 3


def make_agent(rank: int) -> C51Agent:
    return C51Agent(AgentConfig(hidden=(16,), batch_size=8, learning_starts=8), OBS_DIM, 2, 0.0, 10.0,
                    seed=rank, device=torch.device("cpu"))


def add_own_steps(agent: C51Agent, rank: int, first: int) -> None:
    for i in range(first, first + INTERVAL):
        obs = np.array([1000 * rank + i, i % 7, -i], np.float32)
        agent.replay.add_one(obs, i % 2, float(rank), obs + 0.5, i % 5 == 0)


def one_round(agent, rank, protocol):
    before = len(agent.replay)
    report = protocol.run_round(agent, recent_return=0.0)
    added = agent.replay.gather(np.arange(before, len(agent.replay)))
    return {"report": report.__dict__, "added": added.__dict__, "distillation": agent.distillation}


def exchange(rank: int, world_size: int) -> dict:
    peers = init_peers("cpu")  # joins the gloo group the launcher-style harness formed
    agent = make_agent(rank)
    add_own_steps(agent, rank, 0)
    add_own_steps(agent, rank, INTERVAL)
    roomy = TransferProtocol(TransferConfig(interval=INTERVAL, batch=BATCH, budget_bytes=10**6), peers, OBS_DIM, ATOMS)
    first = one_round(agent, rank, roomy)
    add_own_steps(agent, rank, 2 * INTERVAL)
    tight_budget = (world_size - 1) * (EXPERIENCE_BYTES + SCORE_BYTES + TIGHT_ROWS * ROW_BYTES)
    tight = TransferProtocol(TransferConfig(interval=INTERVAL, batch=BATCH, budget_bytes=tight_budget), peers,
                             OBS_DIM, ATOMS)
    second = one_round(agent, rank, tight)
    return {"weights": agent.online.state_dict(), "first": first, "second": second, "budget": tight_budget}


def shared_batch(results, round_name):
    """The round's shared states in rank order, recovered from what the peers of each rank received."""
    states = []
    for source in range(WORLD):
        receiver = results[(source + 1) % WORLD][round_name]["added"]
        states.append(receiver["obs"][receiver["obs"][:, 0] // 1000 == source])
    return torch.from_numpy(np.concatenate(states))


@pytest.fixture(scope="module")
def results():
    return run_ranks(exchange, WORLD, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("round_name,first_index", [("first", INTERVAL), ("second", 2 * INTERVAL)])
def test_agents_receive_their_peers_recent_transitions(results, round_name, first_index):
    for rank, result in enumerate(results):
        added = result[round_name]["added"]
        source, index = added["obs"][:, 0] // 1000, added["obs"][:, 0] % 1000
        assert sorted(np.unique(source, return_counts=True)[1]) == [BATCH] * (WORLD - 1)
        assert result[round_name]["report"]["transitions_received"] == (WORLD - 1) * BATCH
        assert rank not in source
        assert ((index >= first_index) & (index < first_index + INTERVAL)).all()  # from the last interval only
        np.testing.assert_array_equal(added["actions"], index % 2)
        np.testing.assert_array_equal(added["rewards"], source)
        np.testing.assert_array_equal(added["next_obs"], added["obs"] + 0.5)
        np.testing.assert_array_equal(added["terminated"], (index % 5 == 0).astype(np.float32))


def rebuilt_outlooks(results, states):
    """Every rank's view of ``states``, from its returned weights (the agents do not train between rounds)."""
    outlooks = []
    for result in results:
        agent = make_agent(0)
        agent.online.load_state_dict(result["weights"])
        outlooks.append(agent.outlook(states))
    return outlooks


@pytest.mark.slow
def test_students_learn_the_most_confident_peers_distribution(results):
    states = shared_batch(results, "first")
    assert len(states) == WORLD * BATCH
    outlooks = rebuilt_outlooks(results, states)
    teacher = torch.stack([o.entropy for o in outlooks]).argmin(0)
    rows = max(int((teacher == r).sum()) for r in range(WORLD))
    for rank, result in enumerate(results):
        report, targets = result["first"]["report"], result["first"]["distillation"]
        assert report["bytes_sent"] == (WORLD - 1) * (EXPERIENCE_BYTES + SCORE_BYTES + rows * ROW_BYTES)
        assert report["states_taught"] == int((teacher == rank).sum()) and report["states_trimmed"] == 0
        assert len(targets) == int((teacher != rank).sum())
        for state, action, probs in zip(targets.states, targets.actions, targets.probs):
            s = int(torch.nonzero((states == state).all(1)).flatten()[0])
            t = int(teacher[s])
            assert t != rank
            assert int(action) == int(outlooks[t].actions[s])
            torch.testing.assert_close(probs, outlooks[t].probs[s], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_round_is_trimmed_to_the_byte_budget_keeping_the_most_confident_states(results):
    states = shared_batch(results, "second")
    entropy = torch.stack([o.entropy for o in rebuilt_outlooks(results, states)])
    teacher = entropy.argmin(0)
    counts = [int((teacher == r).sum()) for r in range(WORLD)]
    assert max(counts) > TIGHT_ROWS  # otherwise this round would not test trimming
    kept = set()
    for r in range(WORLD):
        mine = torch.nonzero(teacher == r).flatten()
        kept |= {int(i) for i in mine[torch.argsort(entropy[r, mine])[:TIGHT_ROWS]]}
    for rank, result in enumerate(results):
        report, targets = result["second"]["report"], result["second"]["distillation"]
        assert report["bytes_sent"] == (WORLD - 1) * (EXPERIENCE_BYTES + SCORE_BYTES + TIGHT_ROWS * ROW_BYTES)
        assert report["bytes_sent"] <= result["budget"]
        assert report["states_taught"] == min(counts[rank], TIGHT_ROWS)
        assert report["states_trimmed"] == sum(max(0, c - TIGHT_ROWS) for c in counts)
        learned = {int(torch.nonzero((states == s).all(1)).flatten()[0]) for s in targets.states}
        assert learned == {i for i in kept if int(teacher[i]) != rank}


def test_budget_below_the_fixed_part_of_a_round_is_refused():
    peers = PeerGroup(rank=0, world_size=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"transfer.budget_bytes=1000: a round with 4 agents needs at least 5760"):
        TransferProtocol(TransferConfig(interval=100, batch=32, budget_bytes=1000), peers, obs_dim=4, atoms=51)


def test_slurm_task_variables_stand_in_for_rank_and_world_size(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    alone = init_peers("cpu")
    assert (alone.rank, alone.world_size, alone.peers) == (0, 1, [])
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=4 but \['MASTER_ADDR', 'MASTER_PORT'\] not set"):
        init_peers("cpu")
