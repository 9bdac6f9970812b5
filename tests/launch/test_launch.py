"""Launch logic: the Slurm -> torch.distributed mapping, hostfile and world layouts, ``agvm-train --dry-run``
and ``--print-config``, one-line user errors, and the thin launch scripts. Real launches are in
tests/launch/test_multinode.py (deepspeed --hostfile over ssh, torchrun) and tests/launch/test_slurm.py (a real Slurm).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from agvm_ds.commands.train import main as train_main
from agvm_ds.engine.world import hostfile_world, launcher_world, slurm_environment, slurm_hostnames, slurm_world

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SBATCH = LAUNCH / "slurm_swinv2_1b_coco.sbatch"
HOSTFILE_EXAMPLE = LAUNCH / "hostfile.example"
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "CROSS_SIZE", "GROUP_WORLD_SIZE", "HOSTFILE", "NUM_GPUS", "NUM_NODES")
TASK_9 = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_NTASKS": "32", "SLURM_NODEID": "1",
          "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_TASKS_PER_NODE": "8(x4)", "SLURM_JOB_ID": "123456"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No launcher variables from the caller's shell; the environment is restored afterwards (the CLI
    writes the Slurm mapping into os.environ)."""
    saved = dict(os.environ)
    for name in [*LAUNCH_ENV, *(k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF")]:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    return {**env, **extra}


# --- Slurm ------------------------------------------------------------------------------------------

def test_slurm_task_9_maps_to_rank_9_on_the_second_node_with_the_first_host_as_master() -> None:
    env = slurm_environment(TASK_9, hostnames=["gpu01", "gpu02", "gpu03", "gpu04"])

    assert env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu01", "MASTER_PORT": str(20000 + 123456 % 20000)}


def test_exported_master_address_and_port_win_over_the_slurm_defaults() -> None:
    env = slurm_environment({**TASK_9, "MASTER_ADDR": "ib-gpu01", "MASTER_PORT": "29999"}, hostnames=["gpu01"])

    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("ib-gpu01", "29999")


def test_uneven_tasks_per_node_give_each_node_its_own_local_world_size() -> None:
    task = {**TASK_9, "SLURM_NTASKS": "7", "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2),3"}

    assert slurm_environment(task, hostnames=["a", "b", "c"])["LOCAL_WORLD_SIZE"] == "3"


def test_outside_a_slurm_task_the_missing_variables_are_named() -> None:
    with pytest.raises(ValueError, match="SLURM_PROCID, SLURM_LOCALID not set: not inside a Slurm task"):
        slurm_environment({"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a"})


def test_node_lists_are_expanded_by_slurm_itself(slurm_cluster, clean_env) -> None:
    clean_env.setenv("SLURM_CONF", str(slurm_cluster.conf))
    assert slurm_hostnames("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    world = slurm_world({**TASK_9, "SLURM_JOB_NODELIST": "gpu[01-02],cpu5", "SLURM_TASKS_PER_NODE": "8(x2),4",
                         "SLURM_NTASKS": "20"})
    assert (world.ranks, world.hosts, world.ranks_per_node) == (20, ("gpu01", "gpu02", "cpu5"), (8, 8, 4))


def test_cli_dry_run_as_slurm_task_9_prints_its_world(slurm_cluster, clean_env, capsys) -> None:
    for name, value in {**TASK_9, **slurm_cluster.env()}.items():
        clean_env.setenv(name, value)

    assert train_main(["--launcher", "slurm", "--dry-run", "--config", "configs/synthetic_tiny.yaml"]) == 0

    assert os.environ["RANK"] == "9" and os.environ["MASTER_ADDR"] == "gpu01"
    assert capsys.readouterr().out == ""  # only rank 0 prints the report


# --- hostfiles and launcher environments -------------------------------------------------------------

@pytest.mark.parametrize("num_nodes, num_gpus, per_node", [(0, 0, (8, 4, 2)), (2, 0, (8, 4)), (0, 1, (1, 1, 1))])
def test_hostfile_world_follows_deepspeeds_num_nodes_and_num_gpus(tmp_path: Path, num_nodes: int, num_gpus: int,
                                                                  per_node: tuple) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# rack 1\na slots=8\n\n  b   slots=4\nc slots=2 # spare\n")

    world = hostfile_world(str(hostfile), num_nodes, num_gpus)

    assert world.ranks_per_node == per_node and world.hosts == ("a", "b", "c")[:len(per_node)]


@pytest.mark.parametrize("text, message", [("a slots=8\na slots=8\n", "multiple entries for a"),
                                           ("a slots=8\nb 8\n", "bad entry: b 8")])
def test_a_bad_hostfile_is_one_error_line_from_deepspeeds_parser(clean_env, tmp_path: Path, capsys, text: str,
                                                                 message: str) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)

    code = train_main(["--dry-run", "--hostfile", str(hostfile), "--config", "configs/synthetic_tiny.yaml"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("agvm-train: ") and message in err[0]


def test_the_deepspeed_launchers_environment_gives_nodes_and_ranks() -> None:
    world = launcher_world({"WORLD_SIZE": "16", "LOCAL_SIZE": "8", "CROSS_SIZE": "2"})

    assert (world.ranks, world.nodes) == (16, 2)


def test_torchruns_environment_gives_nodes_and_ranks() -> None:
    world = launcher_world({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "3", "GROUP_WORLD_SIZE": "2"})

    assert world.ranks_per_node == (3, 3)


# --- agvm-train --dry-run / --print-config / errors ---------------------------------------------------

def test_dry_run_prints_config_model_deepspeed_config_and_world_without_training(clean_env, capsys,
                                                                                 tmp_path: Path) -> None:
    code = train_main(["--dry-run", "--hostfile", str(HOSTFILE_EXAMPLE), "--num-nodes", "2",
                       "--config", "configs/synthetic_tiny.yaml", "train.gradient_accumulation_steps=3",
                       f"output_dir={tmp_path / 'run'}"])

    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "run").exists()
    assert "world: 16 rank(s) on 2 node(s) (node1 x8, node2 x8)" in out
    assert "batch: 4 images per rank x 16 rank(s) x 3 accumulation = global batch 192" in out
    assert '"gradient_accumulation_steps": 3' in out  # the resolved DeepSpeed config
    assert "model spec (faster_rcnn_r18_tiny)" in out and '"output_dir"' in out
    assert "num_classes: taken from the data set at start-up" in out
    assert re.search(r"steps per epoch: counted at start-up \(at most 3: 600 synthetic images", out)


@pytest.mark.parametrize("config, model, source", [
    ("synthetic_semseg_tiny", "semantic_fpn_r18_tiny", "600 synthetic images)"),
    ("configs/ade20k_upernet_swin_t_bs256.yaml", "upernet_swin_t", "counted at start-up from {root}\n"),
])
def test_dry_run_of_a_segmentation_experiment(config, model, source, clean_env, capsys, tmp_path: Path) -> None:
    code = train_main(["--dry-run", "--num-gpus", "8", "--config", config, f"data.root={tmp_path}",
                       f"output_dir={tmp_path / 'run'}"])

    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "run").exists()
    assert f"model spec ({model})" in out and '"detector": "' in out
    assert source.format(root=tmp_path) in out and "without boxes" not in out


def test_print_config_says_where_num_classes_comes_from(clean_env, capsys) -> None:
    assert train_main(["--print-config", "--config", "configs/synthetic_tiny.yaml"]) == 0

    captured = capsys.readouterr()
    assert '"model": "faster_rcnn_r18_tiny"' in captured.out
    assert "num_classes: taken from the data set at start-up" in captured.err


def test_hostfile_without_dry_run_is_refused(clean_env, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--hostfile", str(HOSTFILE_EXAMPLE)])

    assert exit_info.value.code == 2 and "describe a launch for --dry-run" in capsys.readouterr().err


def test_a_config_error_is_one_line_and_exit_code_2(clean_env, capsys) -> None:
    assert train_main(["--config", "configs/synthetic_tiny.yaml", "train.epochs=0"]) == 2

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agvm-train: ") and "train.epochs" in err[0]


@pytest.mark.slow
def test_a_corrupt_annotation_file_fails_at_start_up_with_one_line(tmp_path: Path) -> None:
    """Trainer construction reads the annotation file: the user's error, not a traceback."""
    images = tmp_path / "images"
    images.mkdir()
    ann = tmp_path / "train.json"
    ann.write_text('{"images": [{"id": 1, "file_name": "a.jpg"')
    args = ["--config", "configs/synthetic_tiny.yaml", f"output_dir={tmp_path / 'run'}", "data.dataset=coco",
            f"data.train_images={images}", f"data.train_ann={ann}", f"data.val_images={images}",
            f"data.val_ann={ann}"]

    result = subprocess.run([sys.executable, "-m", "agvm_ds.commands.train", *args], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=300)

    lines = [line for line in result.stderr.splitlines() if line.startswith("agvm-train: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and str(ann) in lines[0] and "Traceback" not in result.stderr


# --- the scripts ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_sh_dry_run_describes_num_gpus_ranks_on_this_machine() -> None:
    result = subprocess.run(["bash", str(LAUNCH / "local.sh"), "--num-gpus", "3", "--dry-run", "train.epochs=1"],
                            cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "world: 3 rank(s) on 1 node(s)" in result.stdout
    assert '"epochs": 1' in result.stdout and '"output_dir": "runs/synthetic_tiny"' in result.stdout


@pytest.mark.slow
def test_multinode_sh_dry_run_reads_the_hostfile_and_needs_one() -> None:
    ok = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "--hostfile", str(HOSTFILE_EXAMPLE), "--config",
                         "configs/synthetic_tiny.yaml", "--dry-run"], cwd=REPO, env=script_env(NUM_GPUS="2"),
                        capture_output=True, text=True, timeout=300)
    missing = subprocess.run(["bash", str(LAUNCH / "multinode.sh"), "--dry-run"], cwd=REPO, env=script_env(),
                             capture_output=True, text=True, timeout=60)

    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "world: 8 rank(s) on 4 node(s) (node1 x2, node2 x2, node3 x2, node4 x2)" in ok.stdout
    assert missing.returncode != 0 and "give --hostfile PATH" in missing.stderr


def test_sbatch_requests_whole_nodes_with_one_task_per_gpu_and_a_requeue_signal() -> None:
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), re.M))

    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == "8"
    assert directives["signal"] == "B:USR1@600"
    assert {"nodes", "cpus-per-task", "time", "exclusive", "requeue"} <= set(directives)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean() -> None:
    scripts = sorted(str(p.relative_to(REPO)) for p in [*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"),
                                                        *(REPO / "benchmarks").glob("*.sh")])

    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout
