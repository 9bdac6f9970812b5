"""Rank 0's record of a run: ``metrics.csv`` (one row per agent and one ``team`` row per evaluation), the same
scalars in TensorBoard, and learning-curve PNGs drawn from the CSV."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

__all__ = ["METRICS", "RunLog", "plot_run", "read_metrics"]

# Per agent, per evaluation: greedy evaluation return, mean of the last 10 training episodes, mean distillation
# loss since the last evaluation, bytes sent in the last round and in total, exploration rate, and the share of
# each round's shared states this agent taught its peers (mean over the rounds since the last evaluation; the
# agents' shares sum to 1 while no teacher is trimmed), which shows whom the teacher rule picks.
METRICS = ("eval_return", "train_return", "distill_loss", "bytes_per_round", "bytes_total", "epsilon",
           "taught_share")
FIELDS = ("step", "agent") + METRICS


class RunLog:
    def __init__(self, output_dir: Path, resume_step: int | None) -> None:
        self.path = output_dir / "metrics.csv"
        kept = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step] if resume_step else []
        with open(self.path, "w", newline="") as f:  # a resumed run drops what ran past its checkpoint
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, table: Sequence[Sequence[float]]) -> None:
        """``table[agent][metric]`` in the order of METRICS; appends the agents' rows and their mean."""
        team = [_nanmean([row[i] for row in table]) for i in range(len(METRICS))]
        rows = [(str(agent), values) for agent, values in enumerate(table)] + [("team", team)]
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for agent, values in rows:
                writer.writerow([step, agent, *(_fmt(v) for v in values)])
                for name, value in zip(METRICS, values):
                    if not math.isnan(value):
                        self.tensorboard.add_scalar(f"{'team' if agent == 'team' else 'agent' + agent}/{name}",
                                                    value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_run(output_dir: Path) -> list[Path]:
    """learning_curve.png (per-agent and team evaluation return) and transfer.png (distillation loss, bytes, share
    of states taught)."""
    rows = read_metrics(output_dir / "metrics.csv")
    agents = sorted({r["agent"] for r in rows}, key=lambda a: (a == "team", a))
    written = []
    for name, panels in (("learning_curve.png", ("eval_return", "train_return")),
                         ("transfer.png", ("distill_loss", "bytes_per_round", "taught_share"))):
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
        for ax, metric in zip(axes, panels):
            for agent in agents:
                series = [(int(r["step"]), float(r[metric])) for r in rows if r["agent"] == agent and r[metric]]
                label = f"agent {agent}" if agent != "team" else "team mean"
                ax.plot(*zip(*series) if series else ([], []), label=label,
                        linewidth=2.5 if agent == "team" else 1, color="black" if agent == "team" else None)
            ax.set_xlabel("environment steps per agent")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        written.append(output_dir / name)
    return written


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else repr(round(float(value), 6))
