"""The tiny training job the system and real-launch tests start (under each launcher), and how they compare runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from distributed import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DEAD_RANK_DEADLINE_S = 60


def tiny_overrides(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """A few optimizer steps on a small synthetic set: the whole pipeline in seconds."""
    return [
        f"output_dir={run_dir}", f"data.root={data_root}", "data.synthetic_train=24", "data.synthetic_val=8",
        "data.synthetic_size=128", "data.scales=[112,128]", "data.max_size=128", "data.num_workers=0",
        "data.batch_size_per_rank=2", "data.test_size=128",
        "agvm.start_iter=0", "agvm.interval=1", "train.log_interval=1", "schedule.warmup_iters=2", *extra,
    ]


def agvm_train(args: list[str], ranks: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(free_port())}
    if ranks == 1:
        command = [sys.executable, "-m", "agvm_ds.commands.train", *args]
    else:
        command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
                   "--module", "agvm_ds.commands.train", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def tiny_job(run_dir: Path, data_root: Path) -> list[str]:
    """agvm-train arguments: 4 steps on 2 ranks, a checkpoint at step 2, one evaluation at the end, and
    a 30 s process-group timeout so nothing can hang on a dead rank for long."""
    return ["--config", "configs/synthetic_tiny.yaml",
            *tiny_overrides(run_dir, data_root, "train.max_iters=4", "train.checkpoint_iters=2",
                            "train.eval_interval=100", "train.checkpoint_interval=100", "train.dist_timeout_s=30")]


def job_env(**extra: str) -> dict[str, str]:
    """The caller's environment without launcher variables of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_")
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop(process)
    assert process.returncode == 0, output[-5000:]
    return output


def stop(process: subprocess.Popen) -> None:
    """Ends whatever is left of a job this test started (its own process group only)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def latest_checkpoint(run_dir: Path) -> Optional[str]:
    latest = run_dir / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.exists() else None


def wait_for_checkpoint(run_dir: Path, tag: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while latest_checkpoint(run_dir) != tag:
        if process.poll() is not None or time.time() > deadline:
            stop(process)
            output = process.stdout.read()[-5000:]
            raise AssertionError(f"the job ended or stalled before its {tag} checkpoint:\n{output}")
        time.sleep(0.2)


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of the agvm-train process of ``rank`` writing to ``run_dir`` (a path unique to one test).

    /proc shows the environment a process started with: a launcher's RANK, or Slurm's SLURM_PROCID.
    """
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"agvm_ds.commands.train" not in argv or f"output_dir={run_dir}".encode() not in argv:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if f"RANK={rank}".encode() in environ or f"SLURM_PROCID={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} for {run_dir}")


def kill_rank_when_checkpointed(process: subprocess.Popen, run_dir: Path, rank: int) -> tuple[str, float]:
    """kill -9 ``rank`` once the step-2 checkpoint exists; the job's output and seconds it took to end."""
    wait_for_checkpoint(run_dir, "iter_00000002", process)
    os.kill(rank_pid(run_dir, rank), signal.SIGKILL)
    killed_at = time.time()
    try:
        output, _ = process.communicate(timeout=DEAD_RANK_DEADLINE_S + 60)
    finally:
        stop(process)
    return output, time.time() - killed_at


def final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The last checkpoint's model weights and the last evaluation's metrics."""
    tag = latest_checkpoint(run_dir)
    state = torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"], json.loads((run_dir / "eval" / "metrics.json").read_text())


def assert_same_result(run_dir: Path, reference_dir: Path) -> None:
    """Bitwise the same final weights and the same final metrics as the reference run."""
    (weights, metrics), (expected_weights, expected_metrics) = final_state(run_dir), final_state(reference_dir)
    assert latest_checkpoint(run_dir) == latest_checkpoint(reference_dir) == "iter_00000004"
    assert weights.keys() == expected_weights.keys()
    different = [name for name, value in expected_weights.items() if not torch.equal(value, weights[name])]
    assert not different, f"{len(different)} tensors differ from the reference run, e.g. {different[:3]}"
    assert metrics == expected_metrics
