"""Accuracy at 16x the batch: SGD, AdamW and LAMB with and without AGVM, at base batch B and 16B.

Runs ``agvm-train`` once per (batch, optimizer, seed) over {B, 16B} x {SGD, SGD+AGVM, AdamW,
AdamW+AGVM, LAMB} (``--optimizers`` adds SGD+AGVM with the divergence guard holding a module's factor,
``sgd_agvm_guard``, or also bringing it down to at most 1, ``sgd_agvm_fallback``, and LAMB+AGVM,
``lamb_agvm``), all for the same number of epochs, as the paper compares them:

- lr: ``--lr`` per optimizer at batch B, scaled to the run's batch linearly (SGD) or by the square
  root (AdamW, LAMB) through ``optimizer.lr_scaling``;
- warm-up: a fixed fraction of the run (``--warmup-fraction``, 1/8 as in the official bs256
  recipe), i.e. the same number of images at every batch, as the official recipes do (920
  iterations at 256, 460 at 512);
- AGVM: from ``warmup + warmup x 100/920`` (the official bs256 recipe starts 100 iterations after
  its 920 of warm-up), with the preconditioned estimator for AdamW as the paper;
- seeds: ``--seeds-large`` (default 2) for every 16B run, one at B.

A run is finished when its ``sweep_result.json`` exists; an interrupted sweep started again skips
those and continues a partial run with ``--resume auto``. Results: ``runs.md``/``runs.csv`` (each
run), ``summary.md``/``summary.csv`` (mean and spread over seeds), ``agvm.md``/``agvm.csv`` (each
AGVM run's phi and lr factor per module), ``ap_by_epoch.png``, ``ap_by_batch.png`` and
``agvm_factors.png`` (each AGVM run's factors and loss against the step). Before
starting it prints the optimizer steps of every run, and refuses a data set that gives fewer than
``--min-steps`` at 16B.

    python benchmarks/large_batch.py --smoke                                   # minutes on CPU
    python benchmarks/large_batch.py --ranks 8 --launcher deepspeed --out runs/large_batch   # GPUs
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from agvm_ds.commands.train import EXIT_DIVERGED
from agvm_ds.engine.config import ExperimentConfig, load_config
from agvm_ds.engine.loaders import build_datasets, train_loader
from agvm_ds.engine.model_spec import experiment_spec
from agvm_ds.engine.run_log import EVAL_FILE, TRAIN_FILE, read_records

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import write_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULT = "sweep_result.json"


class Variant(NamedTuple):
    """An optimizer of the sweep: the base optimizer, whether AGVM wraps it, the action of AGVM's divergence
    guard (``agvm.guard_action``; None: no guard), and how its lr scales with the batch."""

    optimizer: str
    agvm: bool
    guard: Optional[str]
    scaling: str


OPTIMIZERS = {
    "sgd": Variant("sgd", False, None, "linear"),
    "sgd_agvm": Variant("sgd", True, None, "linear"),
    "sgd_agvm_guard": Variant("sgd", True, "hold", "linear"),
    "sgd_agvm_fallback": Variant("sgd", True, "fallback", "linear"),
    "adamw": Variant("adamw", False, None, "sqrt"),
    "adamw_agvm": Variant("adamw", True, None, "sqrt"),
    "lamb": Variant("lamb", False, None, "sqrt"),
    "lamb_agvm": Variant("lamb", True, None, "sqrt"),
}
PAPER_OPTIMIZERS = ["sgd", "sgd_agvm", "adamw", "adamw_agvm", "lamb"]  # the default grid
DEFAULT_LR = {"sgd": 0.02, "adamw": 1e-3, "lamb": 4e-3}  # at batch B = 16; untuned for the synthetic set
OFFICIAL_AGVM_DELAY = 100 / 920  # official bs256 recipe: AGVM 100 iterations after a 920-iteration warm-up
SMOKE_OVERRIDES = ["data.synthetic_train=40", "data.synthetic_val=8", "data.synthetic_size=64", "data.scales=[64]",
                   "data.max_size=64", "data.test_size=64", "data.num_workers=0", "train.max_iters=1",
                   "train.epochs=1", "train.log_interval=1"]
RUN_COLUMNS = ["run", "batch", "optimizer", "seed", "steps", "peak_lr", "warmup_iters", "agvm_start", "status", "AP",
               "AP50", "AP_by_epoch"]
SUMMARY_COLUMNS = ["batch", "optimizer", "seeds", "diverged", "AP", "AP_std", "AP50"]
AGVM_COLUMNS = ["run", "module", "phi_logged", "phi_mean", "phi_std", "factor_final", "factor_min", "factor_max"]


@dataclass(frozen=True)
class Run:
    """One training run of the sweep and the config overrides that make it."""

    batch: int
    optimizer: str
    seed: int
    steps: int
    overrides: tuple[str, ...]
    peak_lr: float
    warmup_iters: int
    agvm_start: Optional[int]

    @property
    def name(self) -> str:
        return f"b{self.batch}_{self.optimizer}_s{self.seed}"


def plan(base_batch: int, scale: int, optimizers: Sequence[str], seeds_large: int, lr: dict[str, float],
         steps_at: dict[int, int], ranks: int, per_rank: int, warmup_fraction: float) -> list[Run]:
    """Every run of the sweep, with its batch, lr, warm-up and AGVM start resolved."""
    runs = []
    for batch in (base_batch, scale * base_batch):
        if batch % (per_rank * ranks):
            raise ValueError(f"batch {batch} is not a multiple of data.batch_size_per_rank={per_rank} "
                             f"x {ranks} rank(s)")
        accumulation = batch // (per_rank * ranks)
        steps = steps_at[batch]
        warmup = max(1, round(warmup_fraction * steps))
        for optimizer in optimizers:
            name, agvm, guard, scaling = OPTIMIZERS[optimizer]
            ratio = batch / base_batch
            peak = lr[name] * (ratio if scaling == "linear" else math.sqrt(ratio))
            start = warmup + math.ceil(warmup * OFFICIAL_AGVM_DELAY) if agvm else None
            seeds = seeds_large if batch != base_batch else 1
            for seed in range(seeds):
                overrides = (
                    f"seed={seed}", f"data.batch_size_per_rank={per_rank}",
                    f"train.gradient_accumulation_steps={accumulation}",
                    f"optimizer.name={name}", f"optimizer.lr={lr[name]}", f"optimizer.base_batch_size={base_batch}",
                    f"optimizer.lr_scaling={scaling}", f"schedule.warmup_iters={warmup}",
                    f"agvm.enabled={str(agvm).lower()}", f"agvm.guard={str(guard is not None).lower()}",
                    f"agvm.start_iter={start or 0}",
                    f"agvm.precondition={str(name == 'adamw').lower()}",
                    *([f"agvm.guard_action={guard}"] if guard else []),
                )
                runs.append(Run(batch, optimizer, seed, steps, overrides, peak, warmup, start))
    return runs


def select(runs: Sequence[Run], patterns: Sequence[str]) -> list[Run]:
    """The runs whose names match one of ``patterns``; a pattern that matches none is an error."""
    names = [run.name for run in runs]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"--runs {pattern!r} matches no run of this sweep; its runs: {', '.join(names)}")
    return [run for run in runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]


def steps_per_run(config: ExperimentConfig, batches: Sequence[int], ranks: int) -> dict[int, int]:
    """Optimizer steps of a run of ``config`` at each global batch, counted as the trainer counts them
    (the data set's non-empty images, rank 0's micro-batches, whole accumulation windows)."""
    per_rank = config.data.batch_size_per_rank
    datasets = build_datasets(config.data, experiment_spec(config).task, seed=config.seed, is_main=True,
                              barrier=lambda: None)
    micro_batches = len(train_loader(datasets, config.data, 0, ranks, config.seed, 0, 0))
    steps = {}
    for batch in batches:
        per_epoch = micro_batches // (batch // (per_rank * ranks))
        if per_epoch == 0:
            raise ValueError(f"an epoch of {micro_batches} micro-batches of {per_rank} per rank holds no step at "
                             f"batch {batch}: enlarge the data set (--train-images)")
        steps[batch] = min(config.train.max_iters or math.inf, config.train.epochs * per_epoch)
    return steps


def run_folder(out: str | Path, name: str) -> Path:
    """Where the sweep in ``out`` keeps the run called ``name``."""
    return Path(out) / "runs" / name


def command(run: Run, args: argparse.Namespace, run_dir: Path, port: int) -> list[str]:
    """The agvm-train command of ``run``; a run that started before continues from its last checkpoint.
    ``port``: the deepspeed launcher's master port, one per run so that runs side by side do not collide."""
    train = ["--config", args.config, *args.overrides, *run.overrides, f"output_dir={run_dir}"]
    if run_dir.exists():
        train = ["--resume", "auto", *train]
    if args.launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(port),
                "--module", "agvm_ds.commands.train", *train]
    return [sys.executable, "-m", "agvm_ds.commands.train", *train]


def result_of(run: Run, run_dir: Path, diverged: bool = False) -> dict[str, Any]:
    """The run's final bbox AP and its AP after each evaluation, from its eval log. A diverged run
    (stopped by ``train.max_consecutive_skips``) has no final AP: NaN, with the evaluations it made."""
    evals = [r for r in read_records(run_dir / EVAL_FILE) if "bbox" in r]
    if not evals and not diverged:
        raise RuntimeError(f"{run_dir}: training finished without an evaluation in {EVAL_FILE}")
    final = {"AP": math.nan, "AP50": math.nan} if diverged else evals[-1]["bbox"]
    return {
        "run": run.name, "batch": run.batch, "optimizer": run.optimizer, "seed": run.seed, "steps": run.steps,
        "peak_lr": run.peak_lr, "warmup_iters": run.warmup_iters, "agvm_start": run.agvm_start,
        "status": "diverged" if diverged else "finished", "AP": final["AP"], "AP50": final["AP50"],
        "epochs": [r["epoch"] for r in evals], "iterations": [r["iteration"] for r in evals],
        "AP_by_epoch": [r["bbox"]["AP"] for r in evals],
    }


def sweep(runs: Sequence[Run], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Trains every run without a result (continuing partial ones), ``args.jobs`` side by side; returns all
    results. A failed run stops nothing else: the runs beside it finish, then the failures are raised together."""
    pending = []
    for index, run in enumerate(runs, 1):
        if (run_folder(args.out, run.name) / RESULT).is_file():
            print(f"[{index}/{len(runs)}] {run.name}: finished earlier, skipped", flush=True)
        else:
            pending.append((index, run))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        failures = [error for error in pool.map(lambda item: _train(*item, len(runs), args), pending) if error]
    if failures:
        raise RuntimeError("; ".join(failures) + ". Start the sweep again to continue from the last checkpoints")
    return [json.loads((run_folder(args.out, run.name) / RESULT).read_text()) for run in runs]


def _train(index: int, run: Run, total: int, args: argparse.Namespace) -> Optional[str]:
    """Trains one run to its ``sweep_result.json``; the failure's description, or None."""
    folder = run_folder(args.out, run.name)
    cmd = command(run, args, folder, port=args.master_port + index)
    print(f"[{index}/{total}] {run.name}: {' '.join(cmd)}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sweep_stdout.log", "a", encoding="utf-8") as log:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code not in (0, EXIT_DIVERGED):
        return f"{run.name} failed (exit {code}); its output is in {folder / 'sweep_stdout.log'}"
    if code == EXIT_DIVERGED:
        print(f"[{index}/{total}] {run.name}: diverged (see {folder / 'sweep_stdout.log'})", flush=True)
    (folder / RESULT).write_text(json.dumps(result_of(run, folder, code == EXIT_DIVERGED), indent=1))
    print(f"[{index}/{total}] {run.name}: finished", flush=True)
    return None


def summarise(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean final AP over the seeds that finished, per (batch, optimizer), with the sample standard
    deviation, and how many seeds diverged."""
    rows = []
    for key in dict.fromkeys((r["batch"], r["optimizer"]) for r in results):
        seeds = [r for r in results if (r["batch"], r["optimizer"]) == key]
        finished = [r for r in seeds if r["status"] == "finished"]
        ap, ap_std = _mean_std([r["AP"] for r in finished])
        rows.append({"batch": key[0], "optimizer": key[1], "seeds": len(seeds), "diverged": len(seeds) - len(finished),
                     "AP": ap, "AP_std": ap_std, "AP50": _mean_std([r["AP50"] for r in finished])[0]})
    return rows


def agvm_rows(results: Sequence[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """What AGVM measured and did in each AGVM run, per module, from its train log: phi as logged (each log
    record holds the latest statistics step's; mean and standard deviation of one value) and the lr factor
    (final, smallest, largest): the measurements that explain what AGVM changed, or why it changed nothing."""
    rows = []
    for result in results:
        if not OPTIMIZERS[result["optimizer"]].agvm:
            continue
        records = [r["agvm"] for r in read_records(run_folder(out, result["run"]) / TRAIN_FILE) if "agvm" in r]
        for module in records[-1] if records else ():
            phis = [r[module]["phi"] for r in records if math.isfinite(r[module]["phi"])]  # NaN: not measured yet
            factors = [r[module]["factor"] for r in records]
            mean, std = _mean_std(phis)
            rows.append({"run": result["run"], "module": module, "phi_logged": len(phis), "phi_mean": mean,
                         "phi_std": std, "factor_final": factors[-1], "factor_min": min(factors),
                         "factor_max": max(factors)})
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; NaN where there are too few values for either."""
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def plot(results: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """AP against epoch (one line per run; solid at B, dashed at 16B) and final AP against batch per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {name: f"C{i}" for i, name in enumerate(OPTIMIZERS)}
    smallest = min(r["batch"] for r in results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(r["epochs"], r["AP_by_epoch"], "-o" if r["batch"] == smallest else "--x", ms=3,
                color=colours[r["optimizer"]], label=r["run"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("bbox AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ap_by_epoch.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for optimizer in dict.fromkeys(s["optimizer"] for s in summary):
        rows = sorted((s for s in summary if s["optimizer"] == optimizer), key=lambda s: s["batch"])
        ax.errorbar([s["batch"] for s in rows], [s["AP"] for s in rows],
                    yerr=[0.0 if math.isnan(s["AP_std"]) else s["AP_std"] for s in rows],
                    fmt="-o", capsize=3, color=colours[optimizer], label=optimizer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch")
    ax.set_ylabel("final bbox AP (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ap_by_batch.png", dpi=120)
    plt.close(fig)
    return [out / "ap_by_epoch.png", out / "ap_by_batch.png", *plot_factors(results, out, plt)]


def plot_factors(results: Sequence[dict[str, Any]], out: Path, plt: Any) -> list[Path]:
    """Each AGVM run's lr factor per module against the step, beside its loss (log scale, grey): what AGVM did
    before, during and after a loss spike. A cross marks a logged step where the divergence guard held the module."""
    runs = [r for r in results if OPTIMIZERS[r["optimizer"]].agvm]
    if not runs:
        return []
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.8 * len(runs)), squeeze=False)
    for ax, result in zip(axes[:, 0], runs):
        records = read_records(run_folder(out, result["run"]) / TRAIN_FILE)
        measured = [r for r in records if "agvm" in r]
        for i, module in enumerate(measured[-1]["agvm"] if measured else ()):
            steps = [r["iteration"] for r in measured]
            ax.plot(steps, [r["agvm"][module]["factor"] for r in measured], color=f"C{i}", label=module)
            held = [(r["iteration"], r["agvm"][module]["factor"]) for r in measured if r["agvm"][module].get("held")]
            if held:
                ax.plot(*zip(*held), "x", color=f"C{i}", ms=5)
        ax.set_ylabel("lr factor")
        ax.set_title(f"{result['run']}: final AP {result['AP']:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        loss = ax.twinx()
        loss.semilogy([r["iteration"] for r in records], [r["loss"] for r in records], color="grey", lw=0.8)
        loss.set_ylabel("loss", color="grey")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "agvm_factors.png", dpi=120)
    plt.close(fig)
    return [out / "agvm_factors.png"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/large_batch_synthetic.yaml", help="the base recipe")
    parser.add_argument("--base-batch", type=int, default=16, help="the base global batch B")
    parser.add_argument("--scale", type=int, default=16, help="the large batch is scale x B")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=PAPER_OPTIMIZERS,
                        help=f"default: {' '.join(PAPER_OPTIMIZERS)}")
    parser.add_argument("--seeds-large", type=int, default=2, help="seeds of every 16B run")
    parser.add_argument("--runs", nargs="+", metavar="PATTERN",
                        help="only the runs whose names match (shell patterns, e.g. 'b32_*' b2_sgd_s0); "
                             "the tables then cover those runs")
    for name, value in DEFAULT_LR.items():
        parser.add_argument(f"--lr-{name}", type=float, default=value, help=f"{name} lr at batch B (default {value})")
    parser.add_argument("--warmup-fraction", type=float, default=1 / 8, help="warm-up length as a fraction of the run")
    parser.add_argument("--train-images", type=int, help="size of the synthetic training set (data.synthetic_train)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per run (GPUs, or CPU processes)")
    parser.add_argument("--launcher", choices=("process", "deepspeed"), default="process",
                        help="'process': one agvm-train process (--ranks 1); 'deepspeed': the deepspeed launcher")
    parser.add_argument("--master-port", type=int, default=29517, help="the first run's; run i uses this + i")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained side by side (on one GPU, or one CPU core each with OMP_NUM_THREADS=1)")
    parser.add_argument("--min-steps", type=int, default=300, help="refuse a data set with fewer steps at 16B")
    parser.add_argument("--out", default="runs/large_batch")
    parser.add_argument("--smoke", action="store_true",
                        help="the whole sweep in minutes on CPU: 40 images of 64 px, B = 2, one step per run")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run "
                        "(e.g. data.dataset=coco data.train_images=... for a COCO-format set)")
    args = parser.parse_args(argv)
    if args.launcher == "process" and args.ranks != 1:
        parser.error("--ranks > 1 needs --launcher deepspeed")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least 1 run at a time")
    if args.smoke:
        args.base_batch, args.min_steps = 2, 1
        args.overrides = [*SMOKE_OVERRIDES, f"data.root={Path(args.out) / 'data'}", *args.overrides]
    if args.train_images:
        args.overrides = [f"data.synthetic_train={args.train_images}", *args.overrides]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        config = load_config(args.config, args.overrides)
        per_rank = min(config.data.batch_size_per_rank, args.base_batch // args.ranks)
        config = load_config(args.config, [*args.overrides, f"data.batch_size_per_rank={per_rank}"])
        batches = (args.base_batch, args.scale * args.base_batch)
        steps_at = steps_per_run(config, batches, args.ranks)
        if steps_at[batches[1]] < args.min_steps:
            raise ValueError(f"batch {batches[1]} gets {steps_at[batches[1]]} optimizer steps, fewer than --min-steps "
                             f"{args.min_steps}: enlarge the data set (--train-images) or train.epochs")
        lr = {name: getattr(args, f"lr_{name}") for name in DEFAULT_LR}
        runs = plan(args.base_batch, args.scale, args.optimizers, args.seeds_large, lr, steps_at, args.ranks,
                    per_rank, args.warmup_fraction)
        if args.runs:
            runs = select(runs, args.runs)
    except (FileNotFoundError, ValueError) as error:
        print(f"large_batch: {error}", file=sys.stderr)
        return 2
    print(f"large_batch: {len(runs)} runs, {config.train.epochs} epoch(s) each, {args.ranks} rank(s) x {per_rank} "
          f"images per micro-batch; optimizer steps per run: "
          + ", ".join(f"batch {b}: {s}" for b, s in steps_at.items()), flush=True)
    for run in runs:
        print(f"  {run.name}: {run.steps} steps, peak lr {run.peak_lr:.4g}, warm-up {run.warmup_iters}, "
              f"AGVM from {run.agvm_start if run.agvm_start is not None else '-'}", flush=True)
    try:
        results = sweep(runs, args)
    except RuntimeError as error:
        print(f"large_batch: {error}", file=sys.stderr)
        return 1
    summary = summarise(results)
    print(write_table(results, RUN_COLUMNS, out / "runs"))
    print(write_table(summary, SUMMARY_COLUMNS, out / "summary"))
    print(write_table(agvm_rows(results, out), AGVM_COLUMNS, out / "agvm"))
    for path in plot(results, summary, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
