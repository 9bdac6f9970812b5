"""The ~1B SwinV2 detector end to end on this machine's CPU ranks, through the commands a user runs.

    python benchmarks/billion.py [--out runs/billion] [--model faster_rcnn_swinv2_1b_fpn] [--small]
                                 [--stages straight killed one_rank evaluate export profile] [-- key=value ...]

Every stage starts the real commands (``launch/local.sh``, ``agvm-eval``, ``agvm-export``,
``agvm-predict``) on ``configs/synthetic_swinv2_1b.yaml`` (ZeRO-3, activation checkpointing, AdamW with
preconditioned AGVM, bf16 autocast, 256 px) and measures what it did:

- ``straight``: 6 optimizer steps on 2 ranks, checkpoints at steps 3 and 6, a final evaluation; per-rank
  memory (resident before the first step, peak), step time, AGVM factors, checkpoint size and save time.
- ``killed``: the same job killed with ``kill -9`` (the whole process group) after its step-3
  checkpoint, then ``--resume auto``: its step-6 checkpoint must equal ``straight``'s bitwise (every
  tensor of every rank's files: weights, optimizer partitions, AGVM state) and its metrics exactly.
  Its checkpoints are deleted once compared (12 GB each for the 1B), as is ``one_rank``'s.
- ``one_rank``: ``straight``'s step-3 checkpoint resumed on 1 rank (DeepSpeed's universal checkpoint,
  converted on the way) for one step.
- ``evaluate``, ``export``: ``agvm-eval`` of ``straight``; ``agvm-export`` in fp32 and bf16, then
  ``agvm-predict`` with the bf16 file (``agvm_ds.load_detector``) on one image.
- ``profile``: the third step (an AGVM statistics step) under ``torch.profiler`` on 2 ranks, split into
  forward, backward (with the recomputation of checkpointed blocks), optimizer step, AGVM statistics, and
  the time gloo spent in ZeRO-3's collectives (in its own thread, overlapping the others).

``--small`` swaps in a 66M SwinV2 of the same structure (depths 2-2-6-2, window 16): the CI test
runs the whole path with it in minutes. Results: ``OUT/billion.json`` and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic_swinv2_1b.yaml"
STAGES = ("straight", "killed", "one_rank", "evaluate", "export", "profile")
STEPS, KILL_AFTER = 6, 3
#: A SwinV2 of the 1B's structure (window 16, a deep third stage) at 66M parameters, a fifteenth of its size.
SMALL_BACKBONE = ["model_overrides.backbone_kwargs.embed_dim=128", "model_overrides.backbone_kwargs.depths=[2,2,6,2]",
                  "model_overrides.backbone_kwargs.num_heads=[4,8,16,32]"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(threads: int = 1) -> dict[str, str]:
    """``threads`` per rank (fixed: results must not depend on the machine's core count), no launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_free_port())}


class Bench:
    """The benchmark's runs: where they live, the job's arguments, and how to start them."""

    def __init__(self, out: Path, model: Optional[str], small: bool, overrides: Sequence[str]) -> None:
        self.out = out
        self.data = out / "data"
        self.job = [f"data.root={self.data}", *([f"model={model}"] if model else []),
                    *(SMALL_BACKBONE if small else []), *overrides]
        self.log = out / "logs"
        self.log.mkdir(parents=True, exist_ok=True)

    def train_args(self, run: str, *extra: str) -> list[str]:
        return ["--config", CONFIG, f"output_dir={self.out / run}", *self.job, f"train.max_iters={STEPS}",
                f"train.checkpoint_iters={KILL_AFTER}", *extra]

    def start(self, name: str, command: list[str], threads: int = 1) -> subprocess.Popen:
        log = open(self.log / f"{name}.log", "w", encoding="utf-8")
        return subprocess.Popen(command, cwd=REPO, env=_env(threads), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def run(self, name: str, command: list[str], threads: int = 1) -> tuple[str, float]:
        """Runs ``command`` to its end; its output and wall-clock seconds. A failure stops the benchmark."""
        started = time.perf_counter()
        process = self.start(name, command, threads)
        process.wait()
        output = (self.log / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        if process.returncode != 0:
            raise SystemExit(f"billion: {' '.join(command)} failed ({process.returncode}); its log: "
                             f"{self.log / (name + '.log')}\n{output[-3000:]}")
        return output, time.perf_counter() - started

    def local(self, ranks: int, args: list[str]) -> list[str]:
        return ["bash", "launch/local.sh", "--num-gpus", str(ranks), *args]


# --- what a run left behind --------------------------------------------------------------------


def rank_memory(run_dir: Path) -> dict[str, Any]:
    """Each rank's resident memory before its first step and its peak (agvm-train's rank records)."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("rank_*.json"))]
    return {"start_rss_gb": [round(r["start_rss_bytes"] / 1e9, 2) for r in records],
            "peak_rss_gb": [round(r["peak_rss_bytes"] / 1e9, 2) for r in records]}


def checkpoint_facts(run_dir: Path, tag: str) -> dict[str, Any]:
    manifest = json.loads((run_dir / "checkpoints" / tag / "manifest.json").read_text())
    return {"checkpoint_gb": round(sum(manifest["files"].values()) / 1e9, 2), "save_s": manifest.get("save_seconds"),
            "files": len(manifest["files"])}


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    from agvm_ds.engine.run_log import TRAIN_FILE, read_records

    return read_records(run_dir / TRAIN_FILE)


def agvm_factors(records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    return {r["iteration"]: {m: round(v["factor"], 4) for m, v in r["agvm"].items()} for r in records}


def step_seconds(records: list[dict[str, Any]], images_per_step: int) -> list[float]:
    return [round(images_per_step / r["images_per_s"], 1) for r in records]


def compare_values(a: Any, b: Any, where: str = "") -> tuple[int, list[str]]:
    """(tensors in ``a``, paths of the tensors or values that differ in ``b``) of two loaded checkpoint
    files, in one walk: a 1B checkpoint's tensors are memory-mapped, each read should happen once."""
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        return int(torch.is_tensor(a)), [] if same else [where]
    pairs: list[tuple[Any, Any, str]] = []
    differing: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            differing.append(f"{where} (keys)")
        pairs = [(a[k], b[k], f"{where}/{k}") for k in a if k in b]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        pairs = [(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    elif not (a == b or not isinstance(a, (int, float, str, bool, type(None)))):
        differing.append(where)
    tensors = 0
    for x, y, path in pairs:
        count, paths = compare_values(x, y, path)
        tensors, differing = tensors + count, differing + paths
    return tensors, differing


#: What a checkpoint file records of its run's configuration rather than of its state: it names the
#: run's own directory, so two runs never agree on it.
RECORDED_CONFIG = ("ds_config", "config", "ds_version")


def compare_checkpoints(tag_a: Path, tag_b: Path) -> dict[str, Any]:
    """Every file of two checkpoint tags, tensor by tensor (memory-mapped: a 1B checkpoint is 12 GB)."""
    import torch

    files = sorted(p.name for p in tag_a.glob("*.pt"))
    differing, tensors = [], 0
    for name in files:
        a = torch.load(tag_a / name, map_location="cpu", weights_only=False, mmap=True)
        b = torch.load(tag_b / name, map_location="cpu", weights_only=False, mmap=True)
        for key in RECORDED_CONFIG:
            a.pop(key, None), b.pop(key, None)
        count, paths = compare_values(a, b)
        tensors, differing = tensors + count, differing + [f"{name}{d}" for d in paths]
    return {"files": len(files), "tensors": tensors, "differing": differing}


# --- stages ------------------------------------------------------------------------------------


def straight(bench: Bench) -> dict[str, Any]:
    run = bench.out / "straight"
    shutil.rmtree(run, ignore_errors=True)
    output, seconds = bench.run("straight", bench.local(2, bench.train_args("straight")))
    records = train_records(run)
    return {"wall_s": round(seconds, 1), **rank_memory(run), "step_s": step_seconds(records, 2),
            "agvm_factors": agvm_factors(records), "banner": _banner(output),
            **checkpoint_facts(run, f"iter_{STEPS:08d}"), "metrics": _metrics(run)}


def killed(bench: Bench) -> dict[str, Any]:
    run = bench.out / "killed"
    shutil.rmtree(run, ignore_errors=True)
    process = bench.start("killed_first", bench.local(2, bench.train_args("killed")))
    latest = run / "checkpoints" / "latest"
    while not (latest.exists() and latest.read_text().strip() == f"iter_{KILL_AFTER:08d}"):
        if process.poll() is not None:
            raise SystemExit(f"billion: the job to kill ended first; see {bench.log / 'killed_first.log'}")
        time.sleep(0.5)
    time.sleep(5)  # into the next step
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    output, seconds = bench.run("killed_resume", bench.local(2, bench.train_args("killed", "--resume", "auto")))
    tag = f"iter_{STEPS:08d}"
    comparison = compare_checkpoints(bench.out / "straight" / "checkpoints" / tag, run / "checkpoints" / tag)
    straight_metrics = (bench.out / "straight" / "eval" / "metrics.json").read_text()
    same_metrics = (run / "eval" / "metrics.json").read_text() == straight_metrics
    shutil.rmtree(run / "checkpoints")  # compared: 12 GB each for the 1B, and the disk is finite
    return {"resume_wall_s": round(seconds, 1), "load_s": _load_seconds(output), **comparison,
            "bitwise_equal": not comparison["differing"] and same_metrics, "same_metrics": same_metrics}


def one_rank(bench: Bench) -> dict[str, Any]:
    run = bench.out / "one_rank"
    shutil.rmtree(run, ignore_errors=True)
    source = bench.out / "straight" / "checkpoints" / f"iter_{KILL_AFTER:08d}"
    shutil.rmtree(source.with_name(source.name + "_universal"), ignore_errors=True)
    output, seconds = bench.run("one_rank", bench.local(1, bench.train_args(
        "one_rank", "--resume", str(source), f"train.max_iters={KILL_AFTER + 1}")), threads=2)
    records = train_records(run)
    universal = source.with_name(source.name + "_universal")
    result = {"wall_s": round(seconds, 1), "load_s": _load_seconds(output), **rank_memory(run),
              "iterations": [r["iteration"] for r in records], "loss": records[-1]["loss"],
              "universal_gb": round(_size(universal) / 1e9, 2)}
    shutil.rmtree(universal)
    shutil.rmtree(run / "checkpoints")
    return result


def evaluate(bench: Bench) -> dict[str, Any]:
    """agvm-eval in fp32 (the run evaluated under bf16 autocast, so the numbers may differ slightly)."""
    out = bench.out / "eval"
    _, seconds = bench.run("evaluate", ["agvm-eval", str(bench.out / "straight"), "--out", str(out)], threads=2)
    metrics = json.loads((out / "metrics.json").read_text())["bbox"]
    return {"wall_s": round(seconds, 1), "bbox_AP": metrics["AP"], "bbox_AP50": metrics["AP50"]}


def export(bench: Bench) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):
        path = bench.out / f"detector_{dtype}.safetensors"
        _, seconds = bench.run(f"export_{dtype}", ["agvm-export", str(bench.out / "straight"), "--out", str(path),
                                                   "--dtype", dtype])
        result[dtype] = {"gb": round(path.stat().st_size / 1e9, 2), "wall_s": round(seconds, 1)}
    image = min((bench.data / "images" / "val").iterdir())
    predictions = bench.out / "predictions"
    _, seconds = bench.run("predict", ["agvm-predict", str(bench.out / "detector_bf16.safetensors"), str(image),
                                       "--out", str(predictions), "--score-threshold", "0"])
    detections = json.loads((predictions / f"{image.stem}.json").read_text())
    result["predict"] = {"wall_s": round(seconds, 1), "image": image.name, "detections": len(detections)}
    return result


def profile(bench: Bench) -> dict[str, Any]:
    out = bench.out / "profile.json"
    command = ["deepspeed", "--num_gpus", "2", "--master_port", _env()["MASTER_PORT"], "--no_local_rank",
               str(Path(__file__)), "--profile-worker", str(out), "--out", str(bench.out), "--",
               *bench.train_args("profile", "train.max_iters=3")]
    bench.run("profile", command)
    return json.loads(out.read_text())


def _banner(output: str) -> str:
    return next((line for line in output.splitlines() if line.startswith("model ")), "")


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "eval" / "metrics.json").read_text())["bbox"]


def _load_seconds(output: str) -> Optional[float]:
    match = re.search(r"resumed from .* in ([0-9.]+) s", output)
    return float(match[1]) if match else None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- the profiled step (runs on every rank, under the deepspeed launcher) --------------------------

#: Profiler event names of the collectives ZeRO-3 issues (gathers in forward and backward, gradient
#: reduce-scatter, the norm all-reduce), as torch's CPU profiler names gloo's ops.
COLLECTIVE = re.compile(r"^(gloo|nccl):")
REGIONS = ("forward", "backward", "optimizer_step", "agvm_statistics")


def profile_worker(result: Path, job: Sequence[str]) -> None:
    """Two warm-up steps, then the third, an AGVM statistics step, under ``torch.profiler``; rank 0
    writes the split to ``result``."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    from agvm_ds.engine import load_config
    from agvm_ds.engine.trainer import Trainer

    config_args = list(job)
    config = load_config(config_args[1], config_args[2:])
    trainer = Trainer(config)
    engine = trainer.engine
    for name, region in (("backward", "backward"), ("step", "optimizer_step")):
        setattr(engine, name, _within(region, getattr(engine, name)))
    engine.forward = _within("forward", engine.forward)
    batches = trainer.micro_batches()
    for _ in range(2):
        trainer.steps.run_step(batches)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("step"):
            trainer.steps.run_step(batches)
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    split = {region: round(totals.get(region, 0.0), 2) for region in ("step", *REGIONS)}
    split["zero_collectives"] = round(sum(t for k, t in totals.items() if COLLECTIVE.match(k)), 2)
    split["collective_ops"] = sorted(k for k in totals if COLLECTIVE.match(k))
    if trainer.is_main:
        result.write_text(json.dumps(split, indent=1))


def _within(region: str, fn: Callable) -> Callable:
    from torch.profiler import record_function

    def timed(*args, **kwargs):
        with record_function(region):
            return fn(*args, **kwargs)

    return timed


# --- the report --------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "straight": straight, "killed": killed, "one_rank": one_rank, "evaluate": evaluate, "export": export,
    "profile": profile,
}


def report(results: dict[str, Any]) -> str:
    """The measurements as markdown lines."""
    lines = []
    if "straight" in results:
        s = results["straight"]
        lines += [f"- 2 ranks, {STEPS} steps: {s['wall_s']} s wall-clock; step times {s['step_s']} s; resident "
                  f"memory per rank before the first step {s['start_rss_gb']} GB, peak {s['peak_rss_gb']} GB",
                  f"- checkpoint: {s['checkpoint_gb']} GB in {s['files']} files, saved in {s['save_s']} s",
                  f"- AGVM factors by iteration: {s['agvm_factors']}",
                  f"- final bbox metrics: AP {s['metrics']['AP']:.4f}"]
    if "killed" in results:
        k = results["killed"]
        lines.append(f"- kill -9 after step {KILL_AFTER} + --resume auto (loaded in {k['load_s']} s): "
                     f"{k['tensors']} tensors in {k['files']} files compared, {len(k['differing'])} differ; "
                     f"metrics equal: {k['same_metrics']} -> bitwise equal: {k['bitwise_equal']}")
    if "one_rank" in results:
        o = results["one_rank"]
        lines.append(f"- resumed on 1 rank through the universal checkpoint ({o['universal_gb']} GB): iterations "
                     f"{o['iterations']}, loaded in {o['load_s']} s, peak {o['peak_rss_gb']} GB, "
                     f"{o['wall_s']} s in all")
    if "evaluate" in results:
        e = results["evaluate"]
        lines.append(f"- agvm-eval: {e['wall_s']} s, bbox AP {e['bbox_AP']:.4f}")
    if "export" in results:
        x = results["export"]
        lines.append(f"- agvm-export: fp32 {x['fp32']['gb']} GB in {x['fp32']['wall_s']} s, "
                     f"bf16 {x['bf16']['gb']} GB in {x['bf16']['wall_s']} s; agvm-predict (bf16 file): "
                     f"{x['predict']['detections']} detections in {x['predict']['wall_s']} s")
    if "profile" in results:
        p = results["profile"]
        lines.append("- one profiled step (rank 0, seconds): " + ", ".join(f"{k} {p[k]}" for k in ("step", *REGIONS,
                                                                                                  "zero_collectives")))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/billion"))
    parser.add_argument("--model", help="a shipped model name (default: the config's faster_rcnn_swinv2_1b_fpn)")
    parser.add_argument("--small", action="store_true", help="a 66M SwinV2 of the same structure (the CI test)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--profile-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="agvm-train overrides after --")
    args = parser.parse_args(argv)
    if args.profile_worker:
        profile_worker(args.profile_worker, args.overrides)
        return 0
    out = args.out.resolve()
    bench = Bench(out, args.model, args.small, args.overrides)
    results_path = out / "billion.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for stage in args.stages:
        started = time.perf_counter()
        results[stage] = RUNNERS[stage](bench)
        print(f"{stage}: done in {time.perf_counter() - started:.0f} s", flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    print(report({k: v for k, v in results.items() if k in args.stages}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
