"""Real launches on this machine: the deepspeed launcher on one node, `deepspeed --hostfile` over pdsh/ssh on two
"nodes" (aliases of 127.0.0.1), and torchrun with two launcher processes. Each kills one rank with kill -9
mid-run: the job must end within a minute naming the dead rank, and `--resume auto` under the same launcher
must then end bitwise equal (weights and metrics) to the uninterrupted 2-rank local run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from distributed import free_port
from launch_jobs import (
    DEAD_RANK_DEADLINE_S,
    LAUNCH,
    assert_same_result,
    finish,
    job_env,
    kill_rank_when_checkpointed,
    start,
    tiny_job,
)

pytestmark = pytest.mark.slow


def assert_ended_naming_the_dead_rank(output: str, seconds: float, rank: int) -> None:
    assert seconds < DEAD_RANK_DEADLINE_S, f"the job took {seconds:.0f} s to end after rank {rank} died"
    assert f"rank(s) {rank} of 2 died (their process is gone)" in output, output[-5000:]


def test_local_launch_ends_on_a_dead_rank_and_resumes_exactly(tmp_path: Path, tiny_data: Path,
                                                              reference_run: Path) -> None:
    run = tmp_path / "run"
    env = job_env(NUM_GPUS="2", MASTER_PORT=str(free_port()))
    local = ["bash", str(LAUNCH / "local.sh"), *tiny_job(run, tiny_data)]

    output, seconds = kill_rank_when_checkpointed(start(local, env), run, rank=1)
    resumed = finish(start([*local, "--resume", "auto"], env))

    assert_ended_naming_the_dead_rank(output, seconds, rank=1)
    assert "resumed from" in resumed and "at iteration 2" in resumed
    assert_same_result(run, reference_run)


def test_hostfile_launch_on_two_ssh_nodes_ends_on_a_dead_rank_and_resumes_exactly(
        tmp_path: Path, tiny_data: Path, reference_run: Path, ssh_nodes) -> None:
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("agvm-node-a slots=1\nagvm-node-b slots=1\n")
    node_env = tmp_path / "deepspeed_env"  # what DeepSpeed exports to every node; the ranks' thread count
    node_env.write_text("OMP_NUM_THREADS=1\n")
    env = job_env(MASTER_ADDR="agvm-node-a", MASTER_PORT=str(free_port()), DS_ENV_FILE=str(node_env))
    multinode = ["bash", str(LAUNCH / "multinode.sh"), "--hostfile", str(hostfile), *tiny_job(run, tiny_data)]

    output, seconds = kill_rank_when_checkpointed(start(multinode, env), run, rank=1)
    resumed = finish(start([*multinode, "--resume", "auto"], env))

    assert "pdsh -S -f 1024 -w agvm-node-a,agvm-node-b" in resumed  # one launcher per node, over ssh
    assert "agvm-node-b: " in resumed  # pdsh prefixes what the second node's rank prints
    assert_ended_naming_the_dead_rank(output, seconds, rank=1)
    assert "resumed from" in resumed and "at iteration 2" in resumed
    assert_same_result(run, reference_run)


def test_torchrun_with_two_node_agents_ends_on_a_dead_rank_and_resumes_exactly(
        tmp_path: Path, tiny_data: Path, reference_run: Path) -> None:
    run = tmp_path / "run"

    def torchrun_nodes(*extra: str) -> list:
        endpoint = f"127.0.0.1:{free_port()}"
        return [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                       "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                       "--rdzv-id", run.parent.name, "-m", "agvm_ds.commands.train", *tiny_job(run, tiny_data), *extra],
                      job_env()) for node in (0, 1)]

    first, second = torchrun_nodes()
    output, seconds = kill_rank_when_checkpointed(second, run, rank=1)
    first_output = finish_failed(first)
    resumed = [finish(node) for node in torchrun_nodes("--resume", "auto")]

    assert_ended_naming_the_dead_rank(first_output, seconds, rank=1)
    assert "exitcode  : -9" in output  # torchrun's own failure report of the killed worker
    assert "resumed from" in resumed[0] and "at iteration 2" in resumed[0]
    assert_same_result(run, reference_run)


def finish_failed(process) -> str:
    output, _ = process.communicate(timeout=DEAD_RANK_DEADLINE_S + 60)
    assert process.returncode != 0
    return output
