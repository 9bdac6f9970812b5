"""Session fixtures for the launch tests: a real one-node Slurm cluster, two ssh "nodes" (tests/clusters.py),
and the uninterrupted local run of the tiny job that every other launch must reproduce."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from clusters import SLURM_BINARIES, SSH_BINARIES, SlurmCluster, SshNodes, missing
from distributed import free_port
from launch_jobs import LAUNCH, finish, job_env, start, tiny_job


def _started(kind, binaries: tuple[str, ...], packages: str, workdir: Path):
    absent = missing(binaries)
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed (.ci/run installs Debian's {packages})")
    return kind(workdir).start()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd on this machine for the whole session; clients need ``cluster.env()``."""
    cluster = _started(SlurmCluster, SLURM_BINARIES, "slurm-wlm and munge", tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    """sshd on a loopback port and two host aliases of 127.0.0.1, reachable by ssh and pdsh."""
    nodes = _started(SshNodes, SSH_BINARIES, "openssh-server and pdsh", tmp_path_factory.mktemp("ssh"))
    yield nodes
    nodes.stop()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the launch tests' tiny synthetic set is generated (once, by the first job)."""
    return tmp_path_factory.mktemp("tiny_data")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    """The tiny job uninterrupted on 2 local ranks (launch/local.sh): what every other launch must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(start(["bash", str(LAUNCH / "local.sh"), *tiny_job(run_dir, tiny_data)],
                 job_env(NUM_GPUS="2", MASTER_PORT=str(free_port()))))
    return run_dir
