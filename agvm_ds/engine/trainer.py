"""The training loop: a detector, AGVM and DeepSpeed, from one ExperimentConfig.

One process per rank (the ``deepspeed`` launcher, torchrun, Slurm, or a single process). The loop
reads like the recipe: for each optimizer step, ``StepRunner.run_step`` (forward, skip a non-finite
loss on every rank alike, backward, step, over the accumulation window); then log, checkpoint; at
epoch ends evaluate and plot. The pieces are built by ``builders``, which the benchmarks share.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from ..agvm import AGVM
from ..detection import ModelSpec
from ..seeding import step_seed
from . import checkpointing
from .buffers import average_running_stats
from .builders import build_model, build_step_runner
from .config import ExperimentConfig
from .deepspeed_config import deepspeed_config
from .distributed import init_distributed
from .evaluators import build_evaluator, format_metrics
from .loaders import Datasets, TrainLoaders, build_datasets, val_loader
from .model_spec import experiment_spec, trains_masks
from .optim import build_optimizer, describe
from .plots import plot_run
from .rank_memory import return_freed_tensors_at_once
from .run_log import RunLog
from .run_start import start_run
from .schedule import lr_multiplier, peak_lr
from .step import MicroBatch, StepResult, TrainingDiverged

__all__ = ["Trainer", "TrainingDiverged"]

logger = logging.getLogger("agvm_ds")


class Trainer:
    """Builds everything an experiment names, then ``fit()`` trains, evaluates and checkpoints.

    Args:
        config: the experiment.
        resume: ``"auto"`` (continue from the run's last checkpoint if there is one), a checkpoint
            directory, or None (start fresh; existing checkpoints are overwritten as the run goes).
    """

    def __init__(self, config: ExperimentConfig, resume: Optional[str] = None) -> None:
        import deepspeed.comm as dist

        self.config = config
        self.dist = dist
        init_distributed(timeout=datetime.timedelta(seconds=config.train.dist_timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(config.output_dir)
        ds_config = deepspeed_config(config)
        checkpoint = checkpointing.resolve_resume(resume, self.run_dir)
        # the lock, a resume's config check and the config record, before anything is loaded or written
        started = start_run(self.run_dir, config, checkpoint, ds_config, self.is_main)
        self.run_lock = started.lock
        for note in started.notes:
            self._info(note)
        torch.manual_seed(config.seed)
        if not torch.cuda.is_available():
            torch.set_num_threads(_cpu_threads_per_rank(self.world))
            return_freed_tensors_at_once()

        defined = experiment_spec(config)
        with_masks = trains_masks(config, defined)
        self.iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        self.datasets = build_datasets(config.data, defined.task, config.seed, self.is_main, dist.barrier,
                                       with_masks=with_masks)
        self.spec = experiment_spec(config, self.datasets.num_classes, self.datasets.num_stuff)
        self.train_loader = TrainLoaders(self.datasets, config.data, self.rank, self.world, config.seed)
        model = build_model(config, self.datasets.num_classes, self.datasets.num_stuff)

        if checkpoint is not None and checkpoint.needs_universal_load(self.world, ds_config):
            ds_config = checkpointing.with_universal_load(ds_config)
        self.gas = ds_config["gradient_accumulation_steps"]
        self.global_batch = config.data.batch_size_per_rank * self.world * self.gas
        self.steps_per_epoch = len(self.train_loader(0, 0)) // self.gas
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has fewer micro-batches per rank than gradient_accumulation_steps={self.gas}; "
                "lower the batch size, the world size or the accumulation"
            )
        self.total_iters = config.train.max_iters or config.train.epochs * self.steps_per_epoch
        lr = peak_lr(config.optimizer, self.global_batch)
        self.optimizer: AGVM = build_optimizer(model, model.agvm_modules, config.optimizer, lr, config.agvm)
        self.module_params = describe(self.optimizer)
        skips = config.train.max_consecutive_skips if config.train.skip_nonfinite_loss else None
        schedule = lr_multiplier(config.schedule, self.total_iters)
        self.steps = build_step_runner(model, self.optimizer, ds_config, schedule, skips, report=self._info)
        self.engine = self.steps.engine
        self.dtype = self.steps.dtype
        self.log = RunLog(self.run_dir, self.is_main)
        self.epoch, self.batch_in_epoch = 0, 0
        self.last_metrics: dict[str, Any] = {}
        self.saved_iteration: Optional[int] = None
        if checkpoint is not None:
            for message in checkpoint.notes:
                self._info(message)
            load_started = time.perf_counter()
            state = checkpointing.load(self.engine, checkpoint)
            load_seconds = time.perf_counter() - load_started
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
            self.steps.skipped_nonfinite = state["skipped_nonfinite"]
            if checkpoint.world_size != self.world:
                self._continue_on_new_world(checkpoint.world_size, state)
            self.saved_iteration = self.engine.global_steps
            self.log.truncate_after(self.engine.global_steps)
            self._info(f"resumed from {checkpoint.path} at iteration {self.engine.global_steps} "
                       f"(epoch {self.epoch}, micro-batch {self.batch_in_epoch}) in {load_seconds:.1f} s")
        self._info(self._banner(self.spec, lr))

    # --- set-up ---------------------------------------------------------------------------------

    def _continue_on_new_world(self, saved_world: int, state: dict[str, Any]) -> None:
        """Maps the data position of a checkpoint written by ``saved_world`` ranks onto this world.

        The epoch continues after the images already consumed (to the nearest micro-batch); which
        images those are depends on the world size, so the order is not the one the old world would
        have seen. The global batch, and with it the scaled lr, follow the new world.
        """
        consumed = self.batch_in_epoch * saved_world
        self.batch_in_epoch = min(round(consumed / self.world), self.steps_per_epoch * self.gas)
        saved_batch = state.get("global_batch")
        self._info(
            f"checkpoint written by {saved_world} rank(s), resumed on {self.world}: optimizer state re-partitioned "
            f"(DeepSpeed universal checkpoint); epoch {self.epoch} continues at micro-batch {self.batch_in_epoch}; "
            f"global batch {saved_batch} -> {self.global_batch}"
            + ("" if saved_batch == self.global_batch else
               " (set data.batch_size_per_rank or train.gradient_accumulation_steps to keep it)"))

    def _banner(self, spec: ModelSpec, lr: float) -> str:
        modules = ", ".join(f"{m} {n / 1e6:.2f}M" for m, n in self.module_params.items())
        resize = self.config.data.test_resize()
        training_size = (f"training images resized by recipe {self.config.data.recipe!r}" if resize is not None
                         else f"training images resized by the model to {_sizes(spec)}")
        return (
            f"model {spec.name} ({modules}); {_classes(spec, self.datasets)}; {training_size}, "
            f"evaluation images to {_sizes(spec)}; "
            f"{self.world} rank(s) x {self.config.data.batch_size_per_rank} images x "
            f"{self.gas} accumulation = batch {self.global_batch}; peak lr {lr:.4g}; {self.steps_per_epoch} "
            f"steps/epoch, {self.total_iters} steps; ZeRO stage {self.engine.zero_optimization_stage()}, "
            f"{self._precision()}; "
            f"AGVM {'on' if self.config.agvm.enabled else 'off'}"
        )

    def _precision(self) -> str:
        if self.engine.torch_autocast_enabled():
            return f"autocast {self.engine.torch_autocast_dtype()} (fp32 weights)"
        return str(self.dtype)

    def _info(self, message: str) -> None:
        if self.is_main:
            logger.info(message)
            tqdm.write(message)

    # --- training -------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Trains to ``total_iters``; evaluates every ``eval_interval`` epochs and at the end."""
        train = self.config.train
        progress = tqdm(total=self.total_iters, initial=self.engine.global_steps, disable=not self.is_main,
                        desc="train", dynamic_ncols=True)
        if train.eval_at_start and self.engine.global_steps == 0:
            self.evaluate()
        window_start, window_images = time.perf_counter(), 0
        while self.engine.global_steps < self.total_iters:
            micro_batches = self.micro_batches()
            while self.engine.global_steps < self.total_iters:
                it = self.engine.global_steps + 1
                log = it % train.log_interval == 0 or it == self.total_iters
                step = self._run_step(micro_batches, log)
                window_images += step.images * self.world
                if not step.stepped:
                    break  # the epoch's whole accumulation windows are done
                progress.update(1)
                if step.losses is not None:
                    self._log_step(step.losses, window_images / (time.perf_counter() - window_start), progress)
                    window_start, window_images = time.perf_counter(), 0
                if train.checkpoint_iters and it % train.checkpoint_iters == 0:
                    self.save()
            if self.batch_in_epoch >= self.steps_per_epoch * self.gas:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                done = self.engine.global_steps >= self.total_iters
                if done or self.epoch % train.eval_interval == 0:
                    self.evaluate()
                if done or self.epoch % train.checkpoint_interval == 0:
                    self.save()
        progress.close()
        if not self.last_metrics or self.last_metrics.get("iteration") != self.engine.global_steps:
            self.evaluate()
            self.save()
        if self.is_main:
            plot_run(self.run_dir)
        return self.last_metrics

    def micro_batches(self) -> Iterator[MicroBatch]:
        """The rest of this epoch's whole accumulation windows, from ``batch_in_epoch`` on, each seeded
        for its forward pass (proposal sampling) so that a resumed run replays it."""
        usable = self.steps_per_epoch * self.gas
        for images, targets in self.train_loader(self.epoch, self.batch_in_epoch):
            if self.batch_in_epoch >= usable:
                return
            self.batch_in_epoch += 1
            seed = step_seed(self.config.seed, self.rank, self.engine.global_steps, self.batch_in_epoch % self.gas)
            yield MicroBatch(images, targets, seed)

    def _run_step(self, micro_batches: Iterator[MicroBatch], log: bool) -> StepResult:
        try:
            return self.steps.run_step(micro_batches, log)
        except TrainingDiverged as error:
            raise TrainingDiverged(
                f"{error}. Checkpoints in {self.run_dir / checkpointing.CHECKPOINT_DIR} are untouched: lower "
                "optimizer.lr (or lengthen schedule.warmup_iters) and continue with --resume auto") from None

    def _log_step(self, losses: dict[str, float], images_per_s: float, progress: tqdm) -> None:
        """Logs the mean of each loss over the micro-batches since the last record."""
        it = self.engine.global_steps
        lrs = self.engine.lr_scheduler.get_last_lr()
        record = {"iteration": it, "epoch": self.epoch, "loss": sum(losses.values()), **losses,
                  "lr": lrs[0], "images_per_s": images_per_s, "agvm": self.optimizer.statistics(),
                  "agvm_micro_batches": self.world * self.gas}
        self.log.train(record)
        progress.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{images_per_s:.1f}", lr=f"{lrs[0]:.3g}")
        self.engine.monitor.write_events([("Train/loss", record["loss"], self.engine.global_samples),
                                          ("Train/images_per_s", images_per_s, self.engine.global_samples)])

    # --- evaluation and checkpoints ---------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """The task's metrics on the validation split (COCO AP, mIoU or PQ), all ranks sharing the images
        (and BatchNorm statistics)."""
        average_running_stats(self.engine.module)
        even = self.engine.zero_optimization_stage() == 3  # ZeRO-3 forward is collective
        evaluator = build_evaluator(self.spec.task, self.datasets.val, self.iou_types)
        self.engine.eval()
        device = self.engine.device
        loader = val_loader(self.datasets, self.config.data, self.rank, self.world, even)
        owned = loader.batch_sampler.sampler.owned  # past it, ZeRO-3's padding: forwards whose outputs are dropped
        for images, targets in tqdm(loader, desc="eval", disable=not self.is_main, leave=False, dynamic_ncols=True):
            outputs = self.engine([image.to(device, self.dtype) for image in images])
            if owned > 0:
                evaluator.update(outputs[:owned], targets[:owned])
            owned -= len(targets)
        self.engine.train()
        metrics = evaluator.evaluate(self.run_dir / "eval")
        it = self.engine.global_steps
        self.last_metrics = {"iteration": it, "epoch": self.epoch, **metrics}
        self.log.eval(self.last_metrics)
        self._info(f"iteration {it} {format_metrics(metrics)}")
        for iou_type, values in metrics.items():
            self.engine.monitor.write_events(
                [(f"Eval/{iou_type}_{name}", value, self.engine.global_samples) for name, value in values.items()])
        return self.last_metrics

    def save(self) -> None:
        """A checkpoint of every rank's state; the BatchNorm statistics are made identical first, since
        only rank 0's copy is stored."""
        if self.saved_iteration == self.engine.global_steps:
            return
        average_running_stats(self.engine.module)
        state = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_batch": self.global_batch,
                 "skipped_nonfinite": self.steps.skipped_nonfinite, "config": self.config.to_dict()}
        self.saved_iteration = self.engine.global_steps
        checkpointing.save(self.engine, self.run_dir, self.engine.global_steps, state,
                           self.config.train.keep_checkpoints, self.is_main)


def _classes(spec: ModelSpec, datasets: Datasets) -> str:
    if spec.task == "semantic":
        return f"{spec.num_classes} classes (the data set's)"
    classes = (f"{spec.num_classes} classes with background (from the data set's {datasets.num_classes} "
               f"{'thing ' if spec.task == 'panoptic' else ''}categories)")
    return classes + (f", {spec.num_stuff_classes} stuff classes" if spec.task == "panoptic" else "")


def _sizes(spec: ModelSpec) -> str:
    return f"shorter side {spec.min_size}, longer side <= {spec.max_size}"


def _cpu_threads_per_rank(world: int) -> int:
    """CPU ranks share the machine's cores; oversubscribed ranks ran 5-8x slower in our measurements.
    An explicit OMP_NUM_THREADS wins: results then do not depend on how the ranks are spread over nodes."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    return max(1, (os.cpu_count() or 1) // local_ranks)
