"""One C51 agent per seed, one seed after another, then each seed's greedy-return curve summarised.

    nice -n 15 python benchmarks/ltcr_single_agent.py --config cartpole_cleanrl --seeds 1 2 3
    python benchmarks/ltcr_single_agent.py --config acrobot_cleanrl --seeds 1 2 3 --report-only

Each seed is ``python -m ltcr.cli --config <config> --resume seed=<s> output_dir=<out>/<env>/seed<s>`` with one
torch thread; a finished run is skipped, an interrupted one resumes. The wall-clock of a run that went from start
to end in one process is kept in its ``wallclock.json``. The report (printed, and written as ``<out>/<env>/
summary.json`` and ``curves.csv``: step, then one greedy-return column per seed) gives per seed the first step at
which the greedy return reached the task's solved threshold, the step from which it never fell below it again,
the final return, the mean of the last 10 evaluations, and the mean, minimum and number of evaluations below the
threshold in the second half of the run.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's ltcr, installed or not
from ltcr.config import load_config  # noqa: E402
from ltcr.envs import ENVIRONMENTS  # noqa: E402
from ltcr.logs import read_metrics  # noqa: E402

LAST = 10  # evaluations in the "held" window at the end of the run


def curve(folder: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["eval_return"])) for r in read_metrics(folder / "metrics.csv")
            if r["agent"] == "team"]


def finished(folder: Path, steps: int) -> bool:
    latest = folder / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:09d}"


def train(config: str, seed: int, folder: Path, steps: int, overrides: list[str]) -> None:
    if finished(folder, steps):
        print(f"skip (finished): {folder}", flush=True)
        return
    fresh = not (folder / "checkpoints" / "latest").is_file()
    command = [sys.executable, "-m", "ltcr.cli", "--config", config, "--resume", f"seed={seed}",
               f"output_dir={folder}", "train.progress=false", *overrides]
    print("run:", " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if fresh:  # a resumed run's wall-clock would only count its last part
        (folder / "wallclock.json").write_text(json.dumps({"seconds": round(time.time() - start, 1),
                                                           "steps": steps}))


def summarize(curves: dict[int, list[tuple[int, float]]], threshold: float, steps: int) -> dict[int, dict]:
    """Per seed; a return "at threshold" is >= it (every task's solved threshold is a lower bound). The second
    half of the run is where exploration has ended in the CleanRL-settings configs (epsilon at its floor)."""
    report = {}
    for seed, points in curves.items():
        returns = [v for _, v in points]
        first = next((i for i, v in enumerate(returns) if v >= threshold), None)
        held = next((i for i in range(len(returns)) if all(v >= threshold for v in returns[i:])), None)
        late = [v for s, v in points if s > steps // 2]
        report[seed] = {
            "first_step_at_threshold": points[first][0] if first is not None else None,
            "held_from_step": points[held][0] if held is not None else None,
            "final": returns[-1], f"mean_last_{LAST}": round(statistics.fmean(returns[-LAST:]), 2),
            "second_half_mean": round(statistics.fmean(late), 2), "second_half_min": min(late),
            "second_half_below_threshold": f"{sum(v < threshold for v in late)}/{len(late)}",
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cartpole_cleanrl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/ltcr_cleanrl"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value for every seed")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    root = args.out / config.env
    if not args.report_only:
        for seed in args.seeds:
            train(args.config, seed, root / f"seed{seed}", config.train.steps, args.overrides)
    curves = {s: curve(root / f"seed{s}") for s in args.seeds if finished(root / f"seed{s}", config.train.steps)}
    if not curves:
        sys.exit(f"no finished run under {root}")
    threshold = ENVIRONMENTS[config.env].solved
    report = summarize(curves, threshold, config.train.steps)
    for seed in curves:
        clock = root / f"seed{seed}" / "wallclock.json"
        report[seed]["wall_clock_s"] = json.loads(clock.read_text())["seconds"] if clock.is_file() else None
    steps = sorted({s for points in curves.values() for s, _ in points})
    with open(root / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *(f"seed{s}" for s in curves)])
        by_seed = {s: dict(points) for s, points in curves.items()}
        writer.writerows([step, *(by_seed[s].get(step, "") for s in curves)] for step in steps)
    (root / "summary.json").write_text(json.dumps({"config": args.config, "env": config.env,
                                                   "threshold": threshold, "seeds": report}, indent=1))
    print(f"{config.env}, {args.config}, threshold {threshold:g} (greedy, {config.train.eval_episodes} episodes "
          f"every {config.train.eval_interval} steps)")
    for seed, row in report.items():
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in row.items()))
    print(f"curves: {root / 'curves.csv'}, summary: {root / 'summary.json'}")


if __name__ == "__main__":
    main()
