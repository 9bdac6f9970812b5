"""PNG plots of a run from its JSON-lines history: ``agvm-plot RUN_DIR`` or at the end of training.

- ``agvm_phi.png``: per-module gradient variance proxy phi against iteration (the paper's Figure 1);
- ``agvm_factor.png``: per-module AGVM learning-rate factor against iteration;
- ``loss.png``: training loss and its components; ``map.png``: the validation metrics against iteration
  (COCO AP, mIoU or PQ).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .run_log import EVAL_FILE, TRAIN_FILE, read_records

__all__ = ["EVAL_CURVES", "plot_run"]

#: The evaluation curves of ``map.png``: metric kind in ``eval_log.jsonl`` -> the metrics drawn.
EVAL_CURVES = {"bbox": ("AP", "AP50"), "segm": ("AP", "AP50"), "sem_seg": ("mIoU", "mAcc"),
               "panoptic": ("PQ", "PQ_th", "PQ_st")}


def plot_run(run_dir: str | Path) -> list[Path]:
    """Writes the plots that the run's records support; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train = read_records(run_dir / TRAIN_FILE)
    evals = read_records(run_dir / EVAL_FILE)
    if not train and not evals:
        raise FileNotFoundError(f"{run_dir}: no {TRAIN_FILE} or {EVAL_FILE} to plot")
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=120)
        plt.close(fig)
        written.append(run_dir / name)

    agvm = [r for r in train if r.get("agvm")]
    modules = list(agvm[0]["agvm"]) if agvm else []
    for key, name, label, log_scale in (("phi", "agvm_phi.png", "gradient variance proxy phi", True),
                                        ("factor", "agvm_factor.png", "AGVM lr factor", False)):
        points = {m: [(r["iteration"], r["agvm"][m][key]) for r in agvm
                      if math.isfinite(r["agvm"][m][key]) and (r["agvm"][m][key] > 0 or not log_scale)]
                  for m in modules}
        if any(points.values()):
            fig, ax = plt.subplots(figsize=(6, 4))
            for module, series in points.items():
                if series:
                    ax.plot(*zip(*series), label=module)
            ax.set(xlabel="iteration", ylabel=label, yscale="log" if log_scale else "linear")
            ax.set_title(_estimate_note(agvm[-1].get("agvm_micro_batches")), fontsize=8)
            ax.legend()
            ax.grid(alpha=0.3)
            save(fig, name)

    if train:
        fig, ax = plt.subplots(figsize=(6, 4))
        iterations = [r["iteration"] for r in train]
        ax.plot(iterations, [r["loss"] for r in train], label="loss", linewidth=2)
        for component in sorted(k for k in train[0] if k.startswith("loss_")):
            ax.plot(iterations, [r.get(component, math.nan) for r in train], label=component, alpha=0.7)
        ax.set(xlabel="iteration", ylabel="training loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "loss.png")

    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, metrics in EVAL_CURVES.items():
            if kind in evals[0]:
                for metric in metrics:
                    ax.plot([r["iteration"] for r in evals], [r[kind][metric] for r in evals],
                            marker="o", label=f"{kind} {metric}")
        ax.set(xlabel="iteration", ylabel="validation metric")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "map.png")
    return written


def _estimate_note(micro_batches: Optional[int]) -> str:
    """What one statistics step measured: with M micro-batch gradients, phi is an average over M(M-1)/2
    pairs; at M = 2 a single pair, noise of the order of the differences between modules."""
    if micro_batches is None:
        return ""
    note = f"each point from M = {micro_batches} micro-batch gradients (ranks x accumulation)"
    if micro_batches <= 4:
        note += "\nat small M one step's phi is mostly noise (see benchmarks/variance_by_batch.py)"
    return note
