"""End-to-end LTCR runs under torchrun (2 CPU ranks, gloo): logs, plots, and exact resume after kill -9."""
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ltcr.logs import read_metrics

STEPS, CHECKPOINT_AT = 900, 300
SMALL = ["agent.hidden=[16]", "agent.batch_size=16", "agent.learning_starts=100", "agent.buffer_size=2000",
         "agent.target_update=50", "agent.eps_decay_steps=400", "per_agent=[{}, {eps_decay_steps: 200, hidden: [24]}]",
         "transfer.interval=50", "transfer.batch=8", "train.eval_interval=150", "train.eval_episodes=1",
         f"train.checkpoint_interval={CHECKPOINT_AT}", f"train.steps={STEPS}", "train.progress=false"]


def launch(output_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ltcr.cli",
               "--config", "cartpole", *SMALL, f"output_dir={output_dir}", *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_team(process: subprocess.Popen) -> None:
    """kill -9 torchrun and each of its workers (they run in their own process groups), by process id."""
    launcher = psutil.Process(process.pid)
    for proc in [*launcher.children(recursive=True), launcher]:
        proc.kill()
    process.communicate()


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def latest(output_dir: Path) -> str:
    path = output_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else ""


@pytest.mark.slow
def test_run_killed_and_resumed_ends_equal_to_an_uninterrupted_one(tmp_path):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight, killed = launch(straight_dir), launch(killed_dir)
    deadline = time.time() + 300
    while latest(killed_dir) != f"step_{CHECKPOINT_AT:09d}" and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    kill_team(killed)
    assert latest(killed_dir) == f"step_{CHECKPOINT_AT:09d}"  # killed after its first checkpoint, before the end
    finish(launch(killed_dir, "--resume"))
    finish(straight)

    straight_rows, resumed_rows = read_metrics(straight_dir / "metrics.csv"), read_metrics(killed_dir / "metrics.csv")
    assert [int(r["step"]) for r in straight_rows if r["agent"] == "team"] == list(range(150, STEPS + 1, 150))
    assert resumed_rows == straight_rows
    assert float(straight_rows[-1]["bytes_total"]) > 0 and straight_rows[-1]["distill_loss"]
    shares = {}  # the agents' shares of the states taught add up to 1 at every evaluation with rounds (no trimming)
    for r in straight_rows:
        if r["agent"] != "team" and r["taught_share"]:
            shares.setdefault(r["step"], []).append(float(r["taught_share"]))
    assert len(shares) >= 4 and all(len(s) == 2 and sum(s) == pytest.approx(1.0) for s in shares.values())
    for rank in (0, 1):
        a = torch.load(straight_dir / "checkpoints" / f"step_{STEPS:09d}" / f"rank{rank}.pt", weights_only=False)
        b = torch.load(killed_dir / "checkpoints" / f"step_{STEPS:09d}" / f"rank{rank}.pt", weights_only=False)
        for name, tensor in a["agent"]["online"].items():
            assert torch.equal(tensor, b["agent"]["online"][name]), name
        assert a["agent"]["rng"] == b["agent"]["rng"] and a["episodes"]["actions"] == b["episodes"]["actions"]
        assert a["bytes_sent"] == b["bytes_sent"]
    for name in ("learning_curve.png", "transfer.png", "config.yaml"):
        assert (killed_dir / name).stat().st_size > 0
    assert any((killed_dir / "tensorboard").iterdir())
