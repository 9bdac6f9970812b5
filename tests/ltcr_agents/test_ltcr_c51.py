"""C51 pieces of LTCR against first principles: the projected Bellman target and the distillation loss."""
import numpy as np
import pytest
import torch

from ltcr.agent import C51Agent, DistillationTargets
from ltcr.c51 import project_distribution
from ltcr.config import AgentConfig


def brute_force_projection(probs, rewards, terminated, gamma, support):
    """Eq. 7 of the C51 paper: each atom z_i receives p_j * max(0, 1 - |clip(Tz_j) - z_i| / dz) from each j."""
    z = support.double().numpy()
    dz = z[1] - z[0]
    out = np.zeros(probs.shape, dtype=np.float64)
    for b in range(probs.shape[0]):
        for j in range(len(z)):
            tz = np.clip(float(rewards[b]) + gamma * (1 - float(terminated[b])) * z[j], z[0], z[-1])
            for i in range(len(z)):
                out[b, i] += float(probs[b, j]) * max(0.0, 1 - abs(tz - z[i]) / dz)
    return out


@pytest.mark.parametrize("v_min,v_max,atoms", [(0.0, 100.0, 51), (-10.0, 10.0, 11)])
def test_projection_matches_brute_force(v_min, v_max, atoms):
    generator = torch.Generator().manual_seed(0)
    support = torch.linspace(v_min, v_max, atoms)
    probs = torch.softmax(torch.randn(64, atoms, generator=generator, dtype=torch.float64), dim=1)
    # rewards that push atoms past both ends (clamping), onto exact atoms (integers), and in between
    spread = (torch.rand(60, generator=generator) - 0.5) * 3 * (v_max - v_min)
    rewards = torch.cat([torch.tensor([-1e3, 1e3, 0.0, 2.0]), spread])
    rewards = rewards.double()
    terminated = (torch.rand(64, generator=generator) < 0.3).double()
    got = project_distribution(probs, rewards, terminated, 0.99, support.double())
    expected = brute_force_projection(probs, rewards, terminated, 0.99, support)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, atol=1e-10)


def test_projection_of_terminal_transition_is_the_reward_atom():
    support = torch.linspace(0.0, 100.0, 51)
    probs = torch.softmax(torch.randn(1, 51), dim=1)
    got = project_distribution(probs, torch.tensor([6.0]), torch.tensor([1.0]), 0.99, support)
    expected = torch.zeros(1, 51)
    expected[0, 3] = 1.0  # 6.0 lies exactly on atom 3 (spacing 2)
    torch.testing.assert_close(got, expected)


def _kl(p, log_q):
    return float((p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean())


def test_distillation_loss_moves_student_toward_fixed_teacher():
    agent = C51Agent(AgentConfig(hidden=(32,), batch_size=16, learning_starts=16, lr=1e-2), obs_dim=4, n_actions=2,
                     v_min=0.0, v_max=100.0, seed=0, device=torch.device("cpu"))
    states = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    actions = torch.tensor([0, 1] * 8)
    teacher = torch.softmax(-0.5 * (torch.arange(51.0) - 40.0) ** 2, dim=0).expand(16, 51).clone()  # mass near 80
    agent.distillation = DistillationTargets(states=states, actions=actions, probs=teacher)
    rows = torch.arange(16)

    def student():
        with torch.no_grad():
            return agent.online(states)[rows, actions]

    kl_before = _kl(teacher, student())
    mean_before = float((student().exp() * agent.online.support).sum(-1).mean())
    for _ in range(150):
        loss = agent.distill_loss()
        agent.optimizer.zero_grad()
        loss.backward()
        agent.optimizer.step()
    kl_after = _kl(teacher, student())
    mean_after = float((student().exp() * agent.online.support).sum(-1).mean())
    assert kl_after < 0.1 * kl_before, (kl_before, kl_after)
    assert abs(mean_after - 80.0) < 0.2 * abs(mean_before - 80.0), (mean_before, mean_after)
