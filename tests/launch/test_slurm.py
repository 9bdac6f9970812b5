"""The sbatch script under a real one-node Slurm (munged, slurmctld, slurmd from Debian's packages; see
tests/clusters.py): a tiny job on 2 tasks trains, evaluates, checkpoints and exits 0 after being requeued by
its own near-time-limit trap, and a job whose rank is killed ends within a minute naming it, then resumes
when requeued. Both end bitwise equal (weights and metrics) to the uninterrupted 2-rank local run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from launch_jobs import DEAD_RANK_DEADLINE_S, LAUNCH, REPO, assert_same_result, job_env, rank_pid, tiny_job

pytestmark = pytest.mark.slow


def submit(cluster, tmp_path: Path, run: Path, data: Path) -> str:
    """The 1B script on this CPU machine: 2 tasks, no GPUs, an fp32 DeepSpeed config, the tiny job."""
    result = cluster.run_in(REPO, job_env(), "sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                            "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
                            str(LAUNCH / "slurm_swinv2_1b_coco.sbatch"), *tiny_job(run, data),
                            "deepspeed=ds_configs/zero2_fp32.json")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def wait_for_checkpoint(cluster, job_id: str, run: Path, tag: str = "iter_00000002", timeout: float = 600) -> None:
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while not (latest.exists() and latest.read_text().strip() == tag):
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.time() < deadline, f"job {job_id}: {state}"
        time.sleep(0.3)


def release(cluster, job_id: str) -> None:
    """A requeued job may start only once its previous credential has expired (``cred_expire``, 120 s by default,
    10 s in the test cluster): starting it sooner gets it killed as "Job credential revoked"."""
    cluster.wait(job_id, 60, states=("PENDING",))


def test_sbatch_job_requeued_by_its_time_limit_trap_resumes_and_matches_the_local_run(
        slurm_cluster, tmp_path: Path, tiny_data: Path, reference_run: Path) -> None:
    run = tmp_path / "run"
    job_id = submit(slurm_cluster, tmp_path, run, tiny_data)
    wait_for_checkpoint(slurm_cluster, job_id, run)

    # what `#SBATCH --signal=B:USR1@600` sends to the batch shell before the time limit
    assert slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    release(slurm_cluster, job_id)
    job = slurm_cluster.wait(job_id, 600)

    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output[-5000:]
    assert f"near the time limit: requeueing job {job_id}" in output
    assert "(restart 1): 2 tasks" in output and "resumed from" in output and "at iteration 2" in output
    assert (run / "eval" / "metrics_bbox.txt").exists() and (run / "loss.png").exists()
    assert_same_result(run, reference_run)


def test_a_killed_slurm_task_ends_the_job_naming_its_rank_and_a_requeue_resumes_it(
        slurm_cluster, tmp_path: Path, tiny_data: Path, reference_run: Path) -> None:
    run = tmp_path / "run"
    job_id = submit(slurm_cluster, tmp_path, run, tiny_data)
    wait_for_checkpoint(slurm_cluster, job_id, run)

    os.kill(rank_pid(run, 1), signal.SIGKILL)
    killed_at = time.time()
    failed = slurm_cluster.wait(job_id, DEAD_RANK_DEADLINE_S + 60)
    seconds = time.time() - killed_at
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert failed["JobState"] == "FAILED" and seconds < DEAD_RANK_DEADLINE_S, (failed, seconds, output[-5000:])
    assert "task 1: Killed" in output  # srun's report
    assert "rank(s) 1 of 2 died (their process is gone)" in output  # rank 0's

    assert slurm_cluster.run("scontrol", "requeue", job_id).returncode == 0  # the script resumes by default
    release(slurm_cluster, job_id)
    job = slurm_cluster.wait(job_id, 600)

    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (job.get("Reason"), output[-3000:])
    assert "resumed from" in output and "at iteration 2" in output
    assert_same_result(run, reference_run)
