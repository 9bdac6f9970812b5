"""launch/*: the command each script would run, and on how many ranks.

Dry runs only (nothing is launched), plus the sbatch script's real path driven by a stand-in
`srun` that runs the tasks here one after another. No Slurm, ssh or GPU needed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
LOCAL = LAUNCH / "local.sh"
MULTINODE = LAUNCH / "multinode.sh"
SBATCH = LAUNCH / "slurm_swinv2_1b_coco.sbatch"
SLURM_TASK = LAUNCH / "slurm_task.sh"
HOSTFILE_EXAMPLE = LAUNCH / "hostfile.example"

# What the caller's shell may hold and would change what the scripts print.
SCRUBBED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN",
            "HOSTFILE", "NUM_GPUS", "AGVM_ROOT", "AGVM_ENTRY_MODULE", "AGVM_REQUEUE", "DEEPSPEED", "PYTHON"}
FAKE_SLURM_TASK_9 = {"SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4", "SLURM_NTASKS": "32",
                     "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}


def run(script: Path, *args: str, env: dict[str, str] | None = None,
        cwd: Path = REPO) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("SLURM_")}
    clean["AGVM_NO_SCONTROL"] = "1"  # the same node-list expansion whether or not Slurm is installed here
    clean.update(env or {})
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=clean, capture_output=True, text=True,
                          timeout=60)


def plan(result: subprocess.CompletedProcess) -> tuple[list[str], int]:
    """The printed command (as argv) and world size of a successful dry run."""
    assert result.returncode == 0, result.stderr
    command = re.search(r"^command: (.*)$", result.stdout, re.M)
    world_size = re.search(r"^world_size: (\d+) ", result.stdout, re.M)
    assert command and world_size, result.stdout
    return shlex.split(command[1]), int(world_size[1])


def trainer_args(argv: list[str], entry: str = "agvm_ds.engine.cli") -> list[str]:
    return argv[argv.index(entry) + 1:]


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "experiment.yaml"
    path.write_text("train: {epochs: 1}\n")
    return str(path)


# --- local.sh --------------------------------------------------------------------------------------

def test_local_dry_run_prints_a_deepspeed_command_on_two_ranks(config: str) -> None:
    argv, world_size = plan(run(LOCAL, "--num-gpus", "2", "--config", config, "--dry-run",
                                "deepspeed=ds_configs/zero2_fp32.json", "train.epochs=12"))

    assert world_size == 2
    assert argv[:3] == ["deepspeed", "--num_gpus", "2"]
    assert argv[argv.index("--module") + 1] == "agvm_ds.engine.cli"
    assert "--no_local_rank" in argv  # the CLI reads LOCAL_RANK from the environment
    assert trainer_args(argv) == ["--config", config, "deepspeed=ds_configs/zero2_fp32.json", "train.epochs=12"]


def test_local_defaults_to_two_ranks_and_DRY_RUN_env_works(config: str) -> None:
    argv, world_size = plan(run(LOCAL, "--config", config, env={"DRY_RUN": "1"}))

    assert (world_size, argv[1:3]) == (2, ["--num_gpus", "2"])


def test_trainer_flags_after_double_dash_go_before_the_overrides(config: str) -> None:
    argv, _ = plan(run(LOCAL, "--dry-run", "--num_gpus=4", "--config", config, "--resume", "auto",
                       "model.depth=26", "--", "--dry-run"))

    assert argv[2] == "4"
    assert trainer_args(argv) == ["--config", config, "--resume", "auto", "--dry-run", "model.depth=26"]


# --- multinode.sh ----------------------------------------------------------------------------------

def hostfile_slots(path: Path) -> dict[str, int]:
    slots = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            host, spec = line.split()
            slots[host] = int(spec.removeprefix("slots="))
    return slots


def test_multinode_world_size_is_the_sum_of_the_example_hostfile_slots(config: str) -> None:
    slots = hostfile_slots(HOSTFILE_EXAMPLE)

    result = run(MULTINODE, "--hostfile", str(HOSTFILE_EXAMPLE), "--config", config, "--dry-run",
                 "--master-port", "29600", "deepspeed=ds_configs/zero2_bf16.json")
    argv, world_size = plan(result)

    assert world_size == sum(slots.values()) == 32
    first_host = next(iter(slots))
    assert argv[:7] == ["deepspeed", "--hostfile", str(HOSTFILE_EXAMPLE), "--master_addr", first_host,
                        "--master_port", "29600"]
    assert trainer_args(argv) == ["--config", config, "deepspeed=ds_configs/zero2_bf16.json"]


@pytest.mark.parametrize("options, expected", [
    ((), 8 + 4 + 2),
    (("--num-nodes", "2"), 8 + 4),
    (("--num-gpus", "1"), 3),
    (("--num_nodes=1", "--num_gpus=2"), 2),
])
def test_multinode_follows_deepspeeds_num_nodes_and_num_gpus_rules(tmp_path: Path, config: str, options: tuple,
                                                                   expected: int) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# rack 1\na slots=8\n\n  b   slots=4\nc slots=2 # spare\n")

    argv, world_size = plan(run(MULTINODE, "--hostfile", str(hostfile), "--config", config, "--dry-run",
                                "--master-addr", "10.0.0.1", *options))

    assert world_size == expected
    assert argv[argv.index("--master_addr") + 1] == "10.0.0.1"
    for option in options:
        if option.startswith("--"):  # passed on in deepspeed's spelling
            assert "--" + option.split("=")[0][2:].replace("-", "_") in argv


@pytest.mark.parametrize("text, message", [
    ("a slots=8\na slots=8\n", "host a is listed twice"),
    ("a slots=8\nb 8\n", "bad hostfile line"),
    ("# nothing\n", "lists no hosts"),
])
def test_multinode_rejects_hostfiles_deepspeed_would_reject(tmp_path: Path, config: str, text: str,
                                                            message: str) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)

    result = run(MULTINODE, "--hostfile", str(hostfile), "--config", config, "--dry-run")

    assert result.returncode != 0 and message in result.stderr


# --- Slurm -----------------------------------------------------------------------------------------

def test_sbatch_dry_run_maps_slurm_task_9_to_torch_distributed_env(config: str) -> None:
    result = run(SBATCH, "--config", config, "train.epochs=24", env={"DRY_RUN": "1", **FAKE_SLURM_TASK_9})
    argv, world_size = plan(result)

    assert world_size == 32
    assert "RANK=9 LOCAL_RANK=1 WORLD_SIZE=32 MASTER_ADDR=gpu01" in result.stdout
    assert "nodes: gpu01 gpu02 gpu03 gpu04" in result.stdout
    assert argv[0] == "srun" and str(SLURM_TASK) in argv
    assert trainer_args(argv) == ["--config", config, "--resume", "auto",
                                  "deepspeed=ds_configs/zero2_bf16_swin1b.json", "train.epochs=24"]


def test_sbatch_requests_whole_nodes_with_one_task_per_gpu() -> None:
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))

    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"
    assert {"nodes", "cpus-per-task", "time", "exclusive", "requeue"} <= set(directives)


def test_sbatch_dry_run_names_the_missing_slurm_variables(config: str) -> None:
    result = run(SBATCH, "--config", config, "--dry-run")

    assert result.returncode != 0 and "SLURM_JOB_NODELIST is not set" in result.stderr


def test_sbatch_dry_run_expands_a_mixed_node_list(config: str) -> None:
    env = {"SLURM_JOB_NODELIST": "gpu[01-03,07],cpu5", "SLURM_NNODES": "5", "SLURM_NTASKS": "40",
           "SLURM_PROCID": "39", "SLURM_LOCALID": "7", "SLURM_JOB_ID": "123456"}

    result = run(SBATCH, "--config", config, "--dry-run", env=env)

    _, world_size = plan(result)
    assert world_size == 40
    assert "nodes: gpu01 gpu02 gpu03 gpu07 cpu5" in result.stdout
    assert "cpu5: RANK 32-39, LOCAL_RANK 0-7" in result.stdout
    # the default port is derived from the job id so jobs sharing a node do not collide
    assert "RANK=39 LOCAL_RANK=7 WORLD_SIZE=40 MASTER_ADDR=gpu01 MASTER_PORT=23456" in result.stdout


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("login1", ["login1"]),
    ("a-1,b[3],c[5,2]", ["a-1", "b3", "c5", "c2"]),
])
def test_nodelist_fallback_expansion(nodelist: str, hosts: list[str]) -> None:
    result = subprocess.run(["bash", "-c", 'source "$1" && agvm_expand_nodelist_fallback "$2"', "_",
                             str(LAUNCH / "common.sh"), nodelist], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_nodelist_fallback_agrees_with_scontrol() -> None:
    nodelist = "gpu[01-03,07],cpu5"
    expected = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True).stdout
    result = subprocess.run(["bash", "-c", 'source "$1" && agvm_expand_nodelist_fallback "$2"', "_",
                             str(LAUNCH / "common.sh"), nodelist], capture_output=True, text=True, timeout=30)

    assert result.stdout.split() == expected.split()


def test_slurm_task_exports_the_mapping_and_runs_the_command() -> None:
    show = "import os; print(*(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR')))"

    result = run(SLURM_TASK, sys.executable, "-c", show, env=FAKE_SLURM_TASK_9)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["9", "1", "32", "gpu01"]


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: runs --ntasks tasks here, one after another, block-distributed over the nodes.
ntasks=1 per_node=1
while [[ "$1" == -* ]]; do
    case "$1" in --ntasks=*) ntasks=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
    shift
done
echo "srun $ntasks tasks" >>"$FAKE_LOG"
[[ -z "${FAKE_SRUN_SLEEP:-}" ]] || sleep "$FAKE_SRUN_SLEEP"
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" || exit
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >>"$FAKE_LOG"
"""
FAKE_CLI = """import os, sys
print("rank", *(os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")),
      *sys.argv[1:], flush=True)
"""


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """A PATH with stand-ins for srun and scontrol, and a trainer module that prints its rank."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fake_cli.py").write_text(FAKE_CLI)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(tmp_path),
            "PYTHON": sys.executable, "AGVM_ENTRY_MODULE": "fake_cli", "FAKE_LOG": str(tmp_path / "log"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_NTASKS": "4",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_CPUS_PER_TASK": "2"}


def test_sbatch_starts_one_rank_per_slurm_task_with_mapped_env(fake_slurm: dict[str, str], config: str) -> None:
    result = run(SBATCH, "--config", config, "train.epochs=1", env=fake_slurm)

    assert result.returncode == 0, result.stderr
    ranks = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("rank ")]
    port = str(20000 + 4242)
    assert [r[:5] for r in ranks] == [["0", "0", "4", "gpu01", port], ["1", "1", "4", "gpu01", port],
                                      ["2", "0", "4", "gpu01", port], ["3", "1", "4", "gpu01", port]]
    assert ranks[0][5:] == ["--config", config, "--resume", "auto", "deepspeed=ds_configs/zero2_bf16_swin1b.json",
                            "train.epochs=1"]


def test_sbatch_requeues_itself_on_the_time_limit_signal(tmp_path: Path, fake_slurm: dict[str, str],
                                                        config: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("SLURM_")}
    env.update(fake_slurm, AGVM_NO_SCONTROL="1", FAKE_SRUN_SLEEP="2")
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(["bash", str(SBATCH), "--config", config], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:  # the trap is installed before this line is printed
                lines.append(line)
                if line.startswith("command: "):
                    break
            time.sleep(0.5)
            proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@600` sends
            out = "".join(lines) + proc.communicate(timeout=30)[0]
        finally:
            proc.kill()
        err.seek(0)
        assert proc.returncode == 0, err.read()  # it kept waiting for srun, which then finished normally
    assert "requeueing job 4242" in out
    log = Path(fake_slurm["FAKE_LOG"]).read_text().splitlines()
    assert log[0] == "srun 4 tasks" and "scontrol requeue 4242" in log
    assert len([line for line in out.splitlines() if line.startswith("rank ")]) == 4


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, extra, env", [
    (LOCAL, (), {}),
    (MULTINODE, ("--hostfile", str(HOSTFILE_EXAMPLE)), {}),
    (SBATCH, (), FAKE_SLURM_TASK_9),
], ids=["local", "multinode", "sbatch"])
def test_a_missing_config_is_named_in_the_error(tmp_path: Path, script: Path, extra: tuple,
                                                env: dict[str, str]) -> None:
    missing = str(tmp_path / "no_such_experiment.yaml")

    result = run(script, *extra, "--config", missing, "--dry-run", env=env)

    assert result.returncode != 0
    assert f"config file not found: {missing}" in result.stderr
    assert "command:" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (("deepspeed=ds_configs/zero0_fp16.json",), "DeepSpeed config not found: ds_configs/zero0_fp16.json"),
    (("--resume", "/nonexistent/ckpt"), "--resume path not found: /nonexistent/ckpt"),
    (("--num-gpus", "0"), "--num-gpus must be a positive integer"),
    (("--bogus",), "unknown option '--bogus'"),
    (("stray",), "unexpected argument 'stray'"),
])
def test_local_rejects_bad_arguments_with_a_clear_message(config: str, args: tuple, message: str) -> None:
    result = run(LOCAL, "--config", config, "--dry-run", *args)

    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize("script", [LOCAL, MULTINODE, SBATCH], ids=lambda p: p.name)
def test_help_prints_usage(script: Path) -> None:
    result = run(script, "--help")

    assert result.returncode == 0 and "Usage" in result.stdout
    assert not any(line.startswith(("SBATCH", "!")) for line in result.stdout.splitlines())  # directives, shebang


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p.relative_to(REPO)) for p in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])

    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout
