"""Per-module gradient variance (phi) and noise scale of a dense predictor against the global batch size.

The paper's Figure 1: at batch 32 the modules of a detector show similar gradient variance; at
256-1024 the FPN and heads fall far below the backbone, which is why one learning rate for all of
them fails at large batch and AGVM rescales each. This benchmark measures that on our detectors and
segmenters (any model file: ``--config synthetic_semseg_tiny``, ``--config synthetic_panoptic_tiny``),
in one process on CPU, without training at those batches: the gradients of consecutive micro-batches
of ``data.batch_size_per_rank`` images are streamed into windows of M = batch / micro-batch; each
window is one global batch, and yields phi per module from two estimators on the same gradients:

- ``scalar``: the project's estimator (``agvm_ds.agvm.estimator``, what training logs), from
  A = mean ||g_k||^2 and B = ||mean g_k||^2 per module;
- ``halves``: the official AGVM's, 1 - cos between the summed gradients of the window's two halves.

Nothing model-sized is stored per micro-batch: each batch size keeps two running sums (its two
halves) and the squared norms per module. Every batch size sees the same images: a window of 8 is
one of N / 8 disjoint windows of the N = max(batches) images, so small batches get many estimates.
The measurement is repeated over ``--repeats`` data orders (different images and augmentations) for
the spread, at several points of a run: from scratch, after ``--train-steps`` of plain in-process
training at the main job's batch, and at a trained run's newest complete checkpoint (``--run``).

    python benchmarks/variance_by_batch.py --smoke                          # seconds: the pipeline
    nice -n 10 python benchmarks/variance_by_batch.py --train-steps 0 60 \
        --run runs/synthetic_tiny 'data.scales=[128]' data.max_size=128 data.test_size=128
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from agvm_ds.agvm import AGVMConfig
from agvm_ds.agvm.estimator import GradientMoments, noise_scale, variance_proxy
from agvm_ds.agvm.grouping import assign_modules
from agvm_ds.detection import build_detector
from agvm_ds.engine.buffers import RunningStatsSnapshot
from agvm_ds.engine.builders import build_model
from agvm_ds.engine.config import ExperimentConfig, load_config
from agvm_ds.engine.loaders import Datasets, build_datasets, train_loader
from agvm_ds.engine.model_spec import experiment_spec
from agvm_ds.engine.optim import build_optimizer
from agvm_ds.engine.schedule import lr_multiplier, peak_lr
from agvm_ds.engine.trained_run import TrainedRun, consolidated_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import write_table  # noqa: E402

ESTIMATORS = ("scalar", "halves")
SMOKE_OVERRIDES = ["data.synthetic_train=16", "data.synthetic_val=4", "data.synthetic_size=64", "data.scales=[64]",
                   "data.max_size=64", "data.test_size=64", "data.batch_size_per_rank=2", "data.num_workers=0"]
COLUMNS = ["point", "iteration", "batch", "micro_batches", "module", "phi_scalar", "phi_scalar_std", "phi_halves",
           "phi_halves_std", "estimates", "phi_over_backbone", "noise_scale_images"]


# --- the estimators on streamed gradients -------------------------------------------------------


@dataclass
class BatchWindow:
    """Consecutive windows of ``micro_batches`` micro-batch gradients, each one global batch.

    Holds per module the running sums of the window's two halves and of ||g_k||^2; a full window
    becomes one estimate of each estimator and the sums start again.
    """

    micro_batches: int
    num_modules: int
    half_sums: list[list[Optional[torch.Tensor]]] = field(init=False)
    sq_norms: torch.Tensor = field(init=False)
    count: int = field(init=False, default=0)
    estimates: list[dict[str, torch.Tensor]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.micro_batches < 2 or self.micro_batches % 2:
            raise ValueError(f"a batch needs an even number (>= 2) of micro-batches for two halves, "
                             f"got {self.micro_batches}")
        self._reset()

    def _reset(self) -> None:
        self.half_sums = [[None] * self.num_modules, [None] * self.num_modules]
        self.sq_norms = torch.zeros(self.num_modules, dtype=torch.float64)
        self.count = 0

    def add(self, gradients: Sequence[torch.Tensor]) -> None:
        """One micro-batch's flattened gradient per module."""
        half = self.half_sums[int(self.count >= self.micro_batches // 2)]
        for i, g in enumerate(gradients):
            half[i] = g.clone() if half[i] is None else half[i].add_(g)
            self.sq_norms[i] += g.double().square().sum()
        self.count += 1
        if self.count == self.micro_batches:
            self.estimates.append(self._estimate())
            self._reset()

    def _estimate(self) -> dict[str, torch.Tensor]:
        first, second = self.half_sums
        sq_norm_of_mean = torch.stack([((a.double() + b.double()) / self.micro_batches).square().sum()
                                       for a, b in zip(first, second)])
        moments = GradientMoments(self.sq_norms / self.micro_batches, sq_norm_of_mean, self.micro_batches)
        cosine = torch.stack([torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0, eps=1e-300)
                              for a, b in zip(first, second)])
        return {"scalar": variance_proxy(moments), "halves": 1.0 - cosine, "noise_scale": noise_scale(moments)}


def module_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's trainable parameters per AGVM module, as training groups them."""
    named = dict(model.named_parameters())
    return {module: [named[name] for name in names]
            for module, names in assign_modules(model, model.agvm_modules).items()}


def flat_gradients(parameters: dict[str, list[nn.Parameter]]) -> list[torch.Tensor]:
    """Each module's gradient as one vector (zeros for a parameter that got none)."""
    return [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            for params in parameters.values()]


def measure(model: nn.Module, micro_batches: Iterator, micro_batch_size: int,
            batches: Sequence[int]) -> dict[int, list[dict[str, torch.Tensor]]]:
    """Estimates per batch size from the micro-batches' gradients; the model's weights and BatchNorm
    statistics are left as they were."""
    parameters = module_parameters(model)
    windows = {batch: BatchWindow(batch // micro_batch_size, len(parameters)) for batch in batches}
    statistics = RunningStatsSnapshot(model)
    statistics.take()
    model.train()
    for images, targets in micro_batches:
        model.zero_grad(set_to_none=True)
        loss = sum(model(images, targets).values())
        loss.backward()
        gradients = flat_gradients(parameters)
        for window in windows.values():
            window.add(gradients)
    model.zero_grad(set_to_none=True)
    statistics.restore()
    return {batch: window.estimates for batch, window in windows.items()}


# --- the points of a run ------------------------------------------------------------------------


@dataclass
class Point:
    """A model state to measure at: its name in the table and its training iteration."""

    name: str
    iteration: int
    model: nn.Module


def scratch_model(config: ExperimentConfig, num_categories: int, num_stuff: int = 0) -> nn.Module:
    """The model the trainer builds for ``config`` (same seed, spec and resize rule)."""
    torch.manual_seed(config.seed)
    return build_model(config, num_categories, num_stuff)


def checkpoint_model(run: TrainedRun, config: ExperimentConfig) -> nn.Module:
    """The run's newest complete checkpoint (fp32 weights merged across ZeRO ranks) as a trainable model."""
    model = build_detector(run.spec, resize_in_model=config.data.test_resize() is None, load_pretrained=False)
    model.load_state_dict(consolidated_state_dict(run.checkpoint))
    return model


def training_micro_batches(datasets: Datasets, config: ExperimentConfig) -> Iterator:
    """The training set's micro-batches, epoch after epoch, in the trainer's order."""
    epoch = 0
    while True:
        yield from train_loader(datasets, config.data, 0, 1, config.seed, epoch, 0)
        epoch += 1


def train_in_process(model: nn.Module, config: ExperimentConfig, datasets: Datasets, steps: Sequence[int],
                     batch: int) -> Iterator[int]:
    """Plain single-process training with the config's optimizer and schedule at global ``batch``
    (AGVM off); yields at each iteration of ``steps`` so the caller can measure there."""
    micro = config.data.batch_size_per_rank
    accumulation = batch // micro
    optimizer = build_optimizer(model, model.agvm_modules, config.optimizer, peak_lr(config.optimizer, batch),
                                AGVMConfig(enabled=False))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config.schedule, max(steps)))
    data = training_micro_batches(datasets, config)
    iteration = 0
    for target in sorted(steps):
        model.train()
        while iteration < target:
            optimizer.zero_grad(set_to_none=True)
            for _ in range(accumulation):
                images, targets = next(data)
                (sum(model(images, targets).values()) / accumulation).backward()
            optimizer.step()
            schedule.step()
            iteration += 1
        yield iteration


# --- the benchmark ------------------------------------------------------------------------------


def measurement_micro_batches(datasets: Datasets, config: ExperimentConfig, repeat: int, images: int) -> Iterator:
    """The first ``images`` of data order ``repeat``: a shuffle of the training set, with its augmentations,
    that no training epoch uses."""
    loader = train_loader(datasets, config.data, 0, 1, config.seed, 1_000_000 + repeat, 0)
    needed = images // config.data.batch_size_per_rank
    if len(loader) < needed:
        raise ValueError(f"the training set gives {len(loader)} micro-batches of {config.data.batch_size_per_rank}, "
                         f"the largest batch {images} needs {needed}: enlarge the data set (data.synthetic_train) "
                         "or drop the largest --batches")
    for index, micro_batch in enumerate(loader):
        if index == needed:
            return
        yield micro_batch


def summarise(point: Point, estimates: dict[int, list[list[dict[str, torch.Tensor]]]], modules: Sequence[str],
              micro: int) -> list[dict[str, Any]]:
    """Table rows of one point: per batch and module, mean and spread of each estimator over all windows
    of all repeats (the spread of one measurement at that batch)."""
    rows = []
    for batch, per_repeat in estimates.items():
        windows = [window for repeat in per_repeat for window in repeat]
        stacked = {key: torch.stack([w[key] for w in windows]) for key in ("scalar", "halves", "noise_scale")}
        means = {key: stacked[key].mean(dim=0) for key in ESTIMATORS}
        for i, module in enumerate(modules):
            rows.append({
                "point": point.name, "iteration": point.iteration, "batch": batch, "micro_batches": batch // micro,
                "module": module,
                "phi_scalar": float(means["scalar"][i]), "phi_scalar_std": _std(stacked["scalar"][:, i]),
                "phi_halves": float(means["halves"][i]), "phi_halves_std": _std(stacked["halves"][:, i]),
                "estimates": len(windows),
                "phi_over_backbone": float(means["scalar"][i] / means["scalar"][modules.index("backbone")]),
                "noise_scale_images": float(stacked["noise_scale"][:, i].median()) * micro,
            })
    return rows


def _std(values: torch.Tensor) -> float:
    return float(values.std()) if len(values) > 1 else math.nan


def plot(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """The paper's Figure 1 from the table: phi against iteration, one panel per batch; phi against
    batch, one panel per point. Solid: the scalar estimator, dashed: two halves; bars: one spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(dict.fromkeys(r["module"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    points = list(dict.fromkeys(r["point"] for r in rows))
    colours = {m: f"C{i}" for i, m in enumerate(modules)}
    written = []

    def panels(keys: Sequence[Any], key: str, x: str, xlabel: str, title: str, name: str, log_x: bool) -> None:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), sharey=True, squeeze=False)
        for ax, value in zip(axes[0], keys):
            for module in modules:
                selected = sorted((r for r in rows if r[key] == value and r["module"] == module), key=lambda r: r[x])
                xs = [r[x] for r in selected]
                for estimator, style in (("scalar", "-o"), ("halves", "--x")):
                    ax.errorbar(xs, [r[f"phi_{estimator}"] for r in selected],
                                yerr=[0.0 if math.isnan(r[f"phi_{estimator}_std"]) else r[f"phi_{estimator}_std"]
                                      for r in selected],
                                fmt=style, color=colours[module], capsize=2, ms=4,
                                label=module if estimator == "scalar" else None)
            ax.set_title(title.format(value))
            ax.set_xlabel(xlabel)
            if log_x:
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("phi = 1 - cos (two halves)")
        axes[0][0].legend(fontsize=8)
        fig.suptitle("solid: scalar estimator, dashed: official two halves; bars: spread of one measurement",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)

    panels(batches, "batch", "iteration", "iteration", "batch {}", "phi_by_iteration.png", log_x=False)
    panels(points, "point", "batch", "global batch", "{}", "phi_by_batch.png", log_x=True)
    return written


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synthetic_tiny.yaml", help="experiment YAML (ignored with --run)")
    parser.add_argument("--run", help="a run directory: also measure its newest complete checkpoint, with its config")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128, 512], help="global batch sizes")
    parser.add_argument("--train-steps", type=int, nargs="+", default=[0],
                        help="iterations of in-process training from scratch to measure at (0: the untrained model)")
    parser.add_argument("--train-batch", type=int, default=8, help="global batch of the in-process training")
    parser.add_argument("--repeats", type=int, default=3, help="data orders per point, for the spread")
    parser.add_argument("--out", default="runs/variance_by_batch", help="where the table and plots go")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: 16 images of 64 px, batches 4 and 8, training steps 0 and 1, 2 repeats")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (e.g. image size)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.train_steps, args.train_batch, args.repeats = [4, 8], [0, 1], 4, 2
        args.overrides = [*SMOKE_OVERRIDES, f"data.root={Path(args.out) / 'data'}", *args.overrides]
    return args


def check_batches(batches: Sequence[int], micro: int, train_batch: int) -> None:
    for batch in batches:
        if batch % (2 * micro):
            raise ValueError(f"--batches {batch}: must be a multiple of 2 x the micro-batch "
                             f"(data.batch_size_per_rank={micro}) for two equal halves")
    if train_batch % micro:
        raise ValueError(f"--train-batch {train_batch}: must be a multiple of data.batch_size_per_rank={micro}")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    trained = TrainedRun.open(args.run) if args.run else None
    config = load_config(Path(args.run) / "config.json" if trained else args.config, args.overrides)
    micro = config.data.batch_size_per_rank
    batches = sorted(args.batches)
    check_batches(batches, micro, args.train_batch)
    torch.manual_seed(config.seed)
    datasets = build_datasets(config.data, experiment_spec(config).task, seed=config.seed, is_main=True,
                              barrier=lambda: None)
    model = scratch_model(config, datasets.num_classes, datasets.num_stuff)
    modules = list(model.agvm_modules)
    print(f"variance_by_batch: model {config.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters; modules {', '.join(modules)}), training images {config.data.scales} px (max "
          f"{config.data.max_size}), micro-batch {micro}, batches {batches} (M = {[b // micro for b in batches]} "
          f"micro-batches), {args.repeats} data orders x {batches[-1]} images per point; points: in-process training "
          f"at batch {args.train_batch} to iterations {sorted(args.train_steps)}"
          + (f", checkpoint {trained.checkpoint.path}" if trained else ""), flush=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def measure_point(point: Point) -> None:
        point_started = time.perf_counter()
        estimates: dict[int, list] = {batch: [] for batch in batches}
        for repeat in range(args.repeats):
            torch.manual_seed(config.seed * 7919 + repeat)  # proposal sampling
            data = measurement_micro_batches(datasets, config, repeat, batches[-1])
            for batch, windows in measure(point.model, data, micro, batches).items():
                estimates[batch].append(windows)
        point_rows = summarise(point, estimates, modules, micro)
        rows.extend(point_rows)
        write_table(rows, COLUMNS, Path(args.out) / "phi_by_batch")  # a long run's finished points are kept
        largest = {r["module"]: r["phi_scalar"] for r in point_rows if r["batch"] == batches[-1]}
        print(f"  {point.name} (iteration {point.iteration}): batch {batches[-1]} phi "
              + ", ".join(f"{m} {v:.3g}" for m, v in largest.items())
              + f"  [{time.perf_counter() - point_started:.0f} s]", flush=True)

    for iteration in train_in_process(model, config, datasets, args.train_steps, args.train_batch):
        measure_point(Point(f"scratch + {iteration} steps", iteration, model))
    if trained:
        iteration = int(re.sub(r"\D", "", trained.checkpoint.tag) or 0)
        measure_point(Point(f"checkpoint {trained.checkpoint.tag}", iteration, checkpoint_model(trained, config)))
    print(f"variance_by_batch: {len(rows)} rows in {time.perf_counter() - started:.0f} s")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"variance_by_batch: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print((out / "phi_by_batch.md").read_text())
    for path in plot(rows, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
