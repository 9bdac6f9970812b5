"""Real clusters on this machine for the launch tests: a one-node Slurm, and two ssh "nodes".

Both are the real daemons from Debian's packages (.ci/run installs slurm-wlm, munge,
openssh-server and pdsh), started as root with private configuration under a temporary directory
and stopped afterwards. Nothing listens beyond the loopback interface.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from distributed import free_port

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
SSH_BINARIES = ("sshd", "ssh", "ssh-keygen", "pdsh")
NODE_ALIASES = ("agvm-node-a", "agvm-node-b")
HOSTS_MARK = "# agvm-ds launch tests: two ssh 'nodes' on this machine"


def missing(binaries: tuple[str, ...]) -> list[str]:
    """The binaries not found on PATH or in /usr/sbin (where Debian puts the daemons)."""
    path = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin"
    return [name for name in binaries if shutil.which(name, path=path) is None]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.3)


def _stop(process: Optional[subprocess.Popen]) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SlurmCluster:
    """munged, slurmctld and slurmd for this one machine, with the node line ``slurmd -C`` prints.

    Clients find it through ``SLURM_CONF`` (see :meth:`env`); /etc/slurm is left alone.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.conf = workdir / "slurm.conf"
        self.processes: list[subprocess.Popen] = []
        self.munged: Optional[subprocess.Popen] = None

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        for name in ("state", "spool"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        node_line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = re.match(r"NodeName=(\S+)", node_line)[1]
        w = self.workdir
        self.conf.write_text(f"""ClusterName=agvm
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=3600
{node_line} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self._start_munged()
        env = {**os.environ, **self.env()}
        for daemon in ("slurmctld", "slurmd"):
            self.processes.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], env=env,
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: self.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 60, "Slurm's node")
        return self

    def _start_munged(self) -> None:
        """Starts munged as the munge user unless one already answers on the default socket."""
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self.munged = subprocess.Popen(["runuser", "-u", "munge", "--", "munged", "--foreground"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 30, "munged")

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return self.run_in(Path.cwd(), dict(os.environ), *command)

    def run_in(self, cwd: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
        """A Slurm client command; a job submitted this way inherits ``env`` and starts in ``cwd``."""
        return subprocess.run(command, cwd=cwd, env={**env, **self.env()}, capture_output=True, text=True, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, timeout: float, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
                                                                           "TIMEOUT", "NODE_FAIL")) -> dict[str, str]:
        _wait(lambda: self.job(job_id).get("JobState") in states, timeout, f"Slurm job {job_id}")
        return self.job(job_id)

    def stop(self) -> None:
        """Cancels what a failed test left queued or running (the controller is private to these tests), then
        stops the daemons; a job's slurmstepd and srun would otherwise outlive slurmd."""
        self.run("scancel", f"--user={getpass.getuser()}")
        try:
            _wait(lambda: not self.run("squeue", "-h").stdout.strip(), 60, "the cancelled jobs' end")
        finally:
            for process in reversed(self.processes):
                _stop(process)
            _stop(self.munged)


class SshNodes:
    """sshd on a loopback port, a root key, and two /etc/hosts aliases of 127.0.0.1: two "nodes".

    The deepspeed launcher checks each host with a plain ``ssh HOST hostname`` before pdsh runs, so
    the port and key for the two aliases go in an ssh client drop-in (removed by :meth:`stop`); the
    user's ~/.ssh and every other host are left alone.
    """

    CLIENT_CONFIG = Path("/etc/ssh/ssh_config.d/agvm-ds-test-nodes.conf")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.key = workdir / "id_ed25519"
        self.sshd: Optional[subprocess.Popen] = None

    def start(self) -> "SshNodes":
        add_host_aliases()
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        for key in (w / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (w / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (w / "sshd_config").write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {w}/host_ed25519
AuthorizedKeysFile {w}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {w}/sshd.pid
""")
        self.CLIENT_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        self.CLIENT_CONFIG.write_text(f"""Host {' '.join(NODE_ALIASES)}
    Port {self.port}
    IdentityFile {self.key}
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.sshd = subprocess.Popen([shutil.which("sshd", path="/usr/sbin:/sbin") or "sshd", "-D", "-e",
                                      "-f", str(w / "sshd_config")], stdout=subprocess.DEVNULL,
                                     stderr=open(w / "sshd.log", "w"))
        _wait(lambda: all(self.ssh(host, "true").returncode == 0 for host in NODE_ALIASES), 30, "sshd")
        return self

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", host, command], capture_output=True, text=True, timeout=30)

    def stop(self) -> None:
        _stop(self.sshd)
        self.CLIENT_CONFIG.unlink(missing_ok=True)


def add_host_aliases() -> None:
    """Adds the node aliases of 127.0.0.1 to /etc/hosts once (a second call changes nothing)."""
    try:
        if all(socket.gethostbyname(alias) == "127.0.0.1" for alias in NODE_ALIASES):
            return
    except OSError:
        pass
    with open("/etc/hosts", "a") as hosts:
        hosts.write(f"127.0.0.1 {' '.join(NODE_ALIASES)}  {HOSTS_MARK}\n")
