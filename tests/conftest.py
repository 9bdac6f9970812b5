"""Session fixtures for the launch tests: a real one-node Slurm cluster and two ssh "nodes" (tests/clusters.py)."""
from __future__ import annotations

from typing import Iterator

import pytest

from clusters import SLURM_BINARIES, SSH_BINARIES, SlurmCluster, SshNodes, missing


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd on this machine for the whole session; clients need ``cluster.env()``."""
    absent = missing(SLURM_BINARIES)
    if absent:
        pytest.skip(f"Slurm is not installed ({', '.join(absent)} missing; .ci/run installs slurm-wlm and munge)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def ssh_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshNodes]:
    """sshd on a loopback port and two host aliases of 127.0.0.1; pdsh needs ``nodes.env()``."""
    absent = missing(SSH_BINARIES)
    if absent:
        pytest.skip(f"ssh/pdsh are not installed ({', '.join(absent)} missing; .ci/run installs openssh-server, pdsh)")
    nodes = SshNodes(tmp_path_factory.mktemp("ssh")).start()
    yield nodes
    nodes.stop()
