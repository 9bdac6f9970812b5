"""Faults from outside the program, made for real where this machine allows: a full tmpfs, a read-only
bind mount, truncated files, a second job on the same directory, a dead lock holder, a reused pid.

Each ends in one line naming the cause and the path and a documented exit code, leaves the run's
checkpoints and config record consistent, and prints a traceback only with AGVM_DEBUG=1.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from launch_jobs import agvm_train, stop, tiny_overrides

from agvm_ds.engine import run_config
from agvm_ds.engine.run_lock import LOCK_FILE, RunLock, process_start_time
from agvm_ds.errors import CorruptFile, ExitCode, ResumeRefused, RunDirLocked, classify, exit_codes_help, report

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ("agvm-train", "agvm-eval", "agvm-predict", "agvm-export", "agvm-plot", "agvm-model-info")


# --- helpers --------------------------------------------------------------------------------------


def _can_mount() -> bool:
    probe = Path(f"/tmp/agvm_mount_probe_{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(shutil.which("mount") is None or not _can_mount(),
                                 reason="mounting a tmpfs or a bind mount is not permitted here")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``path``: writing past ``size`` fails with ENOSPC, as on a full disk."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextmanager
def read_only(source: Path, path: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``path``: every write under it fails with EROFS."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _train(run: Path, data: Path, *extra: str, ranks: int = 1) -> subprocess.Popen:
    return agvm_train(["--config", "configs/synthetic_tiny.yaml", *tiny_overrides(run, data, *extra)], ranks=ranks,
                      start_new_session=True)


def _ended(process: subprocess.Popen, timeout: float = 300) -> str:
    """The job's output, whatever its exit status (``launch_jobs.finish`` asserts success)."""
    try:
        return process.communicate(timeout=timeout)[0]
    finally:
        stop(process)


def _errors(output: str) -> list[str]:
    """The lines the job printed as its error (the agvm-train: lines), without the launcher's own log."""
    return [line[line.index("agvm-train: "):] for line in output.splitlines() if "agvm-train: " in line]


def _assert_no_traceback(output: str) -> None:
    assert "Traceback (most recent call last)" not in output, output[-4000:]


# --- exit codes and one-line reports --------------------------------------------------------------


def test_every_command_lists_the_one_exit_code_table_in_its_help(capsys):
    from agvm_ds.commands import evaluate, export, model_info, plot, predict, train

    table = exit_codes_help()
    for code in ExitCode:
        assert f"  {int(code):>3}  " in table
    for main in (train.main, evaluate.main, predict.main, export.main, plot.main, model_info.main):
        with pytest.raises(SystemExit) as exited:
            main(["--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert table.splitlines()[0] in out and "  6  no space left" in out and "--debug" in out, out[-2000:]


def test_outside_failures_are_classified_by_cause_and_name_the_path():
    assert classify(OSError(errno.ENOSPC, "No space left on device", "/x/y.pt")) == \
        (ExitCode.NO_SPACE, "/x/y.pt: no space left on device")
    assert classify(OSError(errno.EROFS, "Read-only file system", "/ro/run")) == \
        (ExitCode.FILE_ACCESS, "/ro/run: read-only file system")
    assert classify(PermissionError(errno.EACCES, "Permission denied", "/p"))[0] == ExitCode.FILE_ACCESS
    assert classify(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1"))[0] \
        == ExitCode.PEER_FAILED
    assert classify(KeyError("a bug")) is None


def test_a_report_is_one_line_and_a_traceback_only_with_debug(monkeypatch, capsys):
    error = OSError(errno.ENOSPC, "No space left on device", "/full/file")
    monkeypatch.delenv("AGVM_DEBUG", raising=False)
    assert report("agvm-x", error) == ExitCode.NO_SPACE == 6
    assert capsys.readouterr().err == "agvm-x: /full/file: no space left on device\n"
    monkeypatch.setenv("AGVM_DEBUG", "1")
    try:
        raise error
    except OSError as raised:
        report("agvm-x", raised)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("agvm-x: /full/file: no space left on device\n")
    with pytest.raises(KeyError):  # a bug is not an outside failure: it keeps its traceback
        report("agvm-x", KeyError("bug"))


# --- the run-directory lock -----------------------------------------------------------------------


HOLD = ("import sys, time; from pathlib import Path; from agvm_ds.engine.run_lock import RunLock; "
        "RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)")


def test_a_second_process_is_refused_naming_the_directory_and_the_live_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked) as refused:
            RunLock.acquire(tmp_path)
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {holder.pid} on {socket.gethostname()}" in message
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock.acquire(tmp_path)  # SIGKILL left the file: stale, since its pid is gone
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path):
    """pid reuse: the holder's pid is alive, but it is another process (another start time)."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        holder = {"host": socket.gethostname(), "pid": other.pid, "start_time": process_start_time(other.pid) - 1,
                  "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip()}
        (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
        RunLock.acquire(tmp_path).release()
        holder["start_time"] += 1  # now exactly that live process: held
        (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
        with pytest.raises(RunDirLocked, match=f"pid {other.pid}"):
            RunLock.acquire(tmp_path)
    finally:
        other.kill()
        other.wait()


def test_a_holder_on_another_host_is_never_taken_over_and_a_broken_lock_is_named(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "start_time": 1}))
    with pytest.raises(RunDirLocked, match=f"remove {tmp_path / LOCK_FILE} if that job is gone"):
        RunLock.acquire(tmp_path)
    (tmp_path / LOCK_FILE).write_text('{"host": "trunc')
    with pytest.raises(CorruptFile, match=f"{tmp_path / LOCK_FILE}: not a run lock"):
        RunLock.acquire(tmp_path)


# --- the config record and the resume rules -------------------------------------------------------


def _config(**changes) -> dict:
    from agvm_ds.engine.config import load_config

    values = load_config("configs/synthetic_tiny.yaml").to_dict()
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        section = values
        for parent in parents:
            section = section[parent]
        section[key] = value
    return values


def test_fixed_keys_are_refused_each_named_and_the_others_are_listed():
    changes = run_config.compare(_config(), _config(model="faster_rcnn_r50_fpn", optimizer__name="sgd",
                                                    train__epochs=8, model_overrides={"num_classes": 3}))
    assert list(changes.fixed) == ["model", "model_overrides.num_classes", "optimizer.name"]
    assert changes.allowed == {"train.epochs": (4, 8)}
    refusal = changes.refusal("run/checkpoints/iter_00000002", Path("run/checkpoints/iter_00000002/config.json"))
    assert isinstance(refusal, ResumeRefused) and refusal.code == ExitCode.RESUME_REFUSED
    line = str(refusal)
    assert "\n" not in line and '"adamw" in the checkpoint, "sgd" now' in line and "model_overrides.num_classes" in line
    assert changes.describe_allowed() == "train.epochs 4 -> 8"


def test_the_classes_are_fixed_when_the_annotation_files_change_and_a_moved_data_set_may_resume(tmp_path):
    from agvm_ds.engine.run_start import _comparable

    def coco(name: str, categories: list[dict]) -> dict:
        path = tmp_path / name
        path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
        return _config(data__dataset="coco", data__val_ann=str(path), data__train_ann=str(path))

    shapes = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}]
    trained, moved = coco("trained.json", shapes), coco("moved.json", shapes)
    other = coco("other.json", [{"id": 1, "name": "square"}, {"id": 2, "name": "hexagon"}])
    changes = run_config.compare(*_comparable(trained, 2, other, 2))
    assert changes.fixed == {"data.classes": (["1:square", "2:disc"], ["1:square", "2:hexagon"])}
    assert not run_config.compare(*_comparable(trained, 2, moved, 2)).fixed
    (tmp_path / "trained.json").unlink()  # the checkpoint's annotation file is gone: its classes are unknown
    assert not run_config.compare(*_comparable(trained, 2, other, 2)).fixed
    assert run_config.compare(*_comparable(moved, 2, moved, 3)).fixed == {"deepspeed.zero_stage": (2, 3)}


def test_every_accepted_start_is_kept_in_the_history(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config()))  # a run from before the history existed
    changes = run_config.compare(_config(), _config(train__epochs=8))
    run_config.record_start(tmp_path, _config(train__epochs=8), "resume", "ckpt", changes)
    history = [json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["recorded before this history", "resume"]
    assert history[0]["config"]["train"]["epochs"] == 4 and history[1]["changed"] == {"train.epochs": [4, 8]}
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 8


def test_a_truncated_config_record_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config())[:100])
    with pytest.raises(CorruptFile, match=f"{tmp_path / 'config.json'}: not a valid JSON config"):
        run_config.read_recorded(tmp_path / "config.json")


def test_a_truncated_run_config_is_named_by_the_commands_that_read_it(tmp_path, capsys):
    from agvm_ds.commands import evaluate

    (tmp_path / "config.json").write_text(json.dumps(_config(), indent=2)[:300])
    assert evaluate.main([str(tmp_path)]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"agvm-eval: experiment config {tmp_path / 'config.json'}: not valid")


# --- exported weights -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny untrained detector written by save_detector (as agvm-export writes it)."""
    import torch

    from agvm_ds.data.synthetic import CATEGORIES
    from agvm_ds.detection import build_detector, load_spec
    from agvm_ds.detection.weights import save_detector

    torch.manual_seed(0)
    spec = load_spec("faster_rcnn_r18_tiny", {"num_classes": len(CATEGORIES) + 1})
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_detector(path, build_detector(spec, load_pretrained=False).state_dict(), spec, CATEGORIES)
    return path


@pytest.mark.parametrize("keep", [100, 0.5])
def test_a_truncated_exported_file_is_named_by_load_detector_and_by_agvm_predict(exported, tmp_path, capsys, keep):
    from agvm_ds.commands import predict
    from agvm_ds.detection.weights import load_detector

    data = exported.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])  # header / tensors cut
    with pytest.raises(CorruptFile, match=f"{truncated}: not a readable safetensors file") as error:
        load_detector(truncated)
    assert "may be truncated" in str(error.value) and f"{truncated.stat().st_size} bytes" in str(error.value)
    assert predict.main([str(truncated), str(tmp_path), "--out", str(tmp_path / "out")]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"agvm-predict: {truncated}: not a readable safetensors file")
    assert load_detector(exported).categories  # the whole file still loads


# --- real jobs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """Two optimizer steps of the tiny job on one rank, checkpointed at step 2."""
    root = tmp_path_factory.mktemp("finished")
    process = _train(root / "run", root / "data", "train.max_iters=2")
    output = _ended(process)
    assert process.returncode == 0, output[-4000:]
    return root / "run"


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run that a refused start must leave alone."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_resume_that_changes_the_model_or_optimizer_is_refused_naming_each_key_and_writes_nothing(finished_run):
    run, data = finished_run, finished_run.parent / "data"
    before = _snapshot(run)
    tag = run / "checkpoints" / "iter_00000002"
    process = _train(run, data, "train.max_iters=2", "model=faster_rcnn_r18_fpn", "optimizer.name=sgd", "--resume",
                     "auto")
    output = _ended(process)
    assert process.returncode == ExitCode.RESUME_REFUSED, output[-4000:]
    _assert_no_traceback(output)
    (line,) = _errors(output)
    assert f"cannot resume {tag} (config recorded in {tag / 'config.json'})" in line
    assert 'model: "faster_rcnn_r18_tiny" in the checkpoint, "faster_rcnn_r18_fpn" now' in line
    assert 'optimizer.name: "adamw" in the checkpoint, "sgd" now' in line
    assert _snapshot(run) == before  # config.json, its history and the checkpoints untouched, no lock left

    # a checkpoint from before tags recorded their config: the run's config.json is the reference
    (tag / "config.json").unlink()
    manifest = json.loads((tag / "manifest.json").read_text())
    del manifest["files"]["config.json"]
    (tag / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(run)
    process = _train(run, data, "train.max_iters=2", "optimizer.name=sgd", "--resume", "auto")
    output = _ended(process)
    assert process.returncode == ExitCode.RESUME_REFUSED, output[-4000:]
    (line,) = _errors(output)
    assert f"(config recorded in {run / 'config.json'})" in line and "optimizer.name" in line and "model:" not in line
    assert _snapshot(run) == before


@pytest.mark.slow
def test_a_resume_may_lengthen_the_run_and_each_change_is_logged_and_kept(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    first = _ended(process := _train(run, data, "train.max_iters=2"))
    assert process.returncode == 0, first[-4000:]
    output = _ended(process := _train(run, data, "train.max_iters=3", "train.log_interval=2", "--resume", "auto"))
    assert process.returncode == 0, output[-4000:]
    assert f"config changed on resume from {run / 'checkpoints' / 'iter_00000002'}: train.log_interval 1 -> 2, " \
           "train.max_iters 2 -> 3" in output
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["changed"] == {"train.log_interval": [1, 2], "train.max_iters": [2, 3]}
    assert json.loads((run / "config.json").read_text())["train"]["max_iters"] == 3
    assert json.loads((run / "checkpoints" / "iter_00000003" / "config.json").read_text())["train"]["max_iters"] == 3
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_job_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    first = _train(run, data, "train.max_iters=50")
    try:
        deadline = time.time() + 120
        # the lock is taken first, the config recorded after it: wait for both
        while not ((run / LOCK_FILE).exists() and (run / "config.json").exists()):
            assert first.poll() is None and time.time() < deadline, "the first job ended before taking its lock"
            time.sleep(0.2)
        recorded = (run / "config.json").read_bytes()
        second = _train(run, data, "train.max_iters=7")
        output = _ended(second)
        assert first.poll() is None  # the first job was not disturbed
    finally:
        stop(first)
    assert second.returncode == ExitCode.RUN_DIR_LOCKED, output[-4000:]
    _assert_no_traceback(output)
    (line,) = _errors(output)
    assert f"{run} is in use by another job: held by pid {first.pid} on {socket.gethostname()}" in line
    assert (run / "config.json").read_bytes() == recorded


@pytest.mark.slow
@needs_mount
def test_a_read_only_output_directory_is_one_line_on_rank_0_and_quiet_on_rank_1(tmp_path):
    (tmp_path / "empty").mkdir()
    with read_only(tmp_path / "empty", tmp_path / "ro") as ro:
        with pytest.raises(OSError, match="Read-only file system"):
            (ro / "probe").write_text("x")
        output = _ended(process := _train(ro / "run", tmp_path / "data", "train.max_iters=2", ranks=2))
    assert process.returncode == ExitCode.FILE_ACCESS, output[-4000:]
    _assert_no_traceback(output)
    assert _errors(output) == [f"agvm-train: rank 0: {ro / 'run'}: read-only file system"], output[-4000:]


@pytest.mark.slow
@needs_mount
def test_a_full_disk_keeps_the_previous_checkpoint_names_the_space_needed_and_resumes_from_it(finished_run, tmp_path):
    """A tmpfs that holds the first checkpoint but not the second (sized from the same job's checkpoint,
    250 MB with ZeRO-2 and AdamW): the job ends with one line, the partial checkpoint is removed, and
    once there is room ``--resume auto`` continues from the first."""
    manifest = json.loads((finished_run / "checkpoints" / "iter_00000002" / "manifest.json").read_text())
    checkpoint_bytes = sum(manifest["files"].values())
    data = finished_run.parent / "data"
    with tmpfs(tmp_path / "disk", str(int(checkpoint_bytes * 1.5))) as disk:
        run = disk / "run"
        steps = ("train.max_iters=3", "train.checkpoint_iters=1", "train.eval_interval=100",
                 "train.checkpoint_interval=100")
        output = _ended(process := _train(run, data, *steps))
        assert process.returncode == ExitCode.NO_SPACE, output[-4000:]
        _assert_no_traceback(output)
        (line,) = _errors(output)
        first, second = run / "checkpoints" / "iter_00000001", run / "checkpoints" / "iter_00000002"
        assert line.startswith(f"agvm-train: checkpoint {second} could not be written: no space left on the device")
        assert "a checkpoint of this run needs about " in line and ", the size of iter_00000001)" in line
        assert f"--resume auto continues from {first}" in line
        assert not second.exists() and (run / "checkpoints" / "latest").read_text() == "iter_00000001"
        assert (first / "manifest.json").is_file() and not (run / LOCK_FILE).exists()

        subprocess.run(["mount", "-o", f"remount,size={3 * checkpoint_bytes + (50 << 20)}", str(disk)], check=True)
        output = _ended(process := _train(run, data, *steps, "--resume", "auto"))
        assert process.returncode == 0, output[-4000:]
        assert f"resumed from {first} at iteration 1" in output
        assert (run / "checkpoints" / "latest").read_text() == "iter_00000003"


def test_the_documented_exit_code_table_is_the_one_in_the_code():
    rows = [line for line in (REPO / "docs" / "faults.md").read_text().splitlines() if line.startswith("| ")][2:]
    documented = {int(row.split("|")[1]): row.split("|")[2].strip(" `") for row in rows}
    assert documented == {int(code): code.name for code in ExitCode}


@pytest.mark.slow
@needs_mount
def test_a_full_disk_on_two_ranks_is_named_by_the_ranks_it_hit_and_the_other_says_why_it_stopped(finished_run,
                                                                                                   tmp_path):
    manifest = json.loads((finished_run / "checkpoints" / "iter_00000002" / "manifest.json").read_text())
    with tmpfs(tmp_path / "disk", str(int(sum(manifest["files"].values()) * 1.5))) as disk:
        run = disk / "run"
        output = _ended(process := _train(run, finished_run.parent / "data", "train.max_iters=3",
                                          "train.checkpoint_iters=1", ranks=2))
        assert process.returncode == ExitCode.NO_SPACE, output[-4000:]
        _assert_no_traceback(output)
        lines = _errors(output)
        full = [line for line in lines if "could not be written: no space left on the device" in line]
        assert full and all(line.startswith("agvm-train: rank ") for line in lines), lines
        peer = ("rank(s) 0 of 2 died", "rank(s) 1 of 2 died", "another rank failed", "rank 0's save failed")
        assert all(line in full or any(p in line for p in peer) for line in lines), lines
        assert (run / "checkpoints" / "latest").read_text() == "iter_00000001"
        assert not (run / "checkpoints" / "iter_00000002").exists() or \
            not (run / "checkpoints" / "iter_00000002" / "manifest.json").exists()
