"""Where the ranks of a run come from, and how they are laid out over nodes.

``deepspeed.init_distributed`` reads only RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
The deepspeed launcher and torchrun set them; a Slurm step sets SLURM_* instead, so
:func:`slurm_environment` maps one to the other (as mmengine's ``_init_dist_slurm`` does) inside
the trainer's process, with ``scontrol show hostnames`` naming the first host. A dry run describes
the world a launch would make: from a hostfile (read with DeepSpeed's own parser), a Slurm
allocation, a launcher's environment, or one machine.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

__all__ = ["World", "hostfile_world", "launcher_world", "local_world", "slurm_environment", "slurm_hostnames",
           "slurm_world"]


@dataclass(frozen=True)
class World:
    """Ranks per node, in rank order; ``hosts`` is empty when the launcher does not name them."""

    ranks_per_node: tuple[int, ...]
    source: str
    hosts: tuple[str, ...] = ()

    @property
    def ranks(self) -> int:
        return sum(self.ranks_per_node)

    @property
    def nodes(self) -> int:
        return len(self.ranks_per_node)

    def describe(self) -> str:
        if self.hosts:
            layout = ", ".join(f"{host} x{n}" for host, n in zip(self.hosts, self.ranks_per_node))
        else:
            layout = " + ".join(str(n) for n in self.ranks_per_node) + " per node"
        return f"{self.ranks} rank(s) on {self.nodes} node(s) ({layout}), from {self.source}"


def local_world(num_ranks: int = 1) -> World:
    return World((num_ranks,), "this machine" if num_ranks > 1 else "a single process (no launcher)")


def hostfile_world(path: str, num_nodes: int = 0, num_gpus: int = 0) -> World:
    """The ranks ``deepspeed --hostfile PATH [--num_nodes N] [--num_gpus G]`` would start, by DeepSpeed's rules."""
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, fetch_hostfile, parse_inclusion_exclusion

    pool = fetch_hostfile(path)
    if pool is None:
        raise FileNotFoundError(f"hostfile not found: {path}")
    active = apply_num_nodes_and_gpus(parse_inclusion_exclusion(pool, "", ""), num_nodes, num_gpus)
    return World(tuple(len(slots) for slots in active.values()), f"hostfile {path}", tuple(active))


def launcher_world(environ: Mapping[str, str]) -> World:
    """The world a launcher (deepspeed, torchrun) set up, from the variables it gives every rank."""
    ranks = int(environ["WORLD_SIZE"])
    per_node = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or ranks)
    nodes = int(environ.get("CROSS_SIZE") or environ.get("GROUP_WORLD_SIZE") or max(1, ranks // per_node))
    return World((per_node,) * nodes, "the launcher's environment (WORLD_SIZE, LOCAL_WORLD_SIZE)")


def slurm_hostnames(nodelist: str) -> list[str]:
    """A Slurm node list (``gpu[01-04],cpu5``) expanded by Slurm itself."""
    if shutil.which("scontrol") is None:
        raise FileNotFoundError("scontrol not found: Slurm's client commands are needed to expand SLURM_JOB_NODELIST")
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.split():
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: scontrol cannot expand it ({result.stderr.strip()})")
    return result.stdout.split()


def _required(environ: Mapping[str, str], names: Sequence[str]) -> list[str]:
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise ValueError(f"--launcher slurm: {', '.join(missing)} not set: not inside a Slurm task "
                         "(start the trainer with srun, as launch/slurm_swinv2_1b_coco.sbatch does)")
    return [environ[name] for name in names]


def slurm_environment(environ: Mapping[str, str], hostnames: Optional[list[str]] = None) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT of this Slurm task.

    MASTER_ADDR defaults to the allocation's first host and MASTER_PORT to 20000 + job id mod 20000
    (two jobs sharing a node do not collide); either wins when already exported.
    """
    rank, local_rank, ntasks, nodelist = _required(
        environ, ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST"))
    mapped = {"RANK": rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": ntasks}
    per_node = _tasks_per_node(environ)
    if per_node:
        mapped["LOCAL_WORLD_SIZE"] = str(per_node[int(environ.get("SLURM_NODEID", 0))])
    mapped["MASTER_ADDR"] = environ.get("MASTER_ADDR") or (hostnames or slurm_hostnames(nodelist))[0]
    job_id = environ.get("SLURM_JOB_ID")
    mapped["MASTER_PORT"] = environ.get("MASTER_PORT") or str(20000 + int(job_id) % 20000 if job_id else 29500)
    return mapped


def slurm_world(environ: Mapping[str, str]) -> World:
    """The world of the Slurm allocation or step this process runs in."""
    ntasks, nodelist = _required(environ, ("SLURM_NTASKS", "SLURM_JOB_NODELIST"))
    hosts = slurm_hostnames(nodelist)
    per_node = _tasks_per_node(environ) or [int(ntasks) // len(hosts)] * len(hosts)
    return World(tuple(per_node), f"Slurm job {environ.get('SLURM_JOB_ID', '?')} ({nodelist})", tuple(hosts))


def _tasks_per_node(environ: Mapping[str, str]) -> list[int]:
    """Slurm's compressed tasks-per-node list, ``2(x3),1`` -> [2, 2, 2, 1]; empty if not set."""
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for item in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if match is None:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r}: cannot read {item!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts
