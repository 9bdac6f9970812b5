"""``agvm-train``: train a detector from an experiment config, on one process or many.

    agvm-train --config configs/synthetic_tiny.yaml [--resume auto] [key.sub=value ...]
    deepspeed --num_gpus 8 --no_local_rank --module agvm_ds.commands.train --config configs/coco_faster_rcnn_r50_bs256.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m agvm_ds.commands.train ...
    srun python -m agvm_ds.commands.train --launcher slurm ...

Run as a single process (no launcher), it sets up a world of one on its own. ``--launcher slurm``
maps the Slurm task's SLURM_* variables to the ones torch.distributed reads. ``--print-config``
prints the resolved configuration; ``--dry-run`` prints the configuration, the model, the DeepSpeed
config and the world layout (of this launch, or of ``--hostfile``/``--num-gpus``), and exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from ..engine.config import ExperimentConfig, load_config
from ..engine.distributed import single_process_world
from ..engine.model_spec import experiment_spec
from ..engine.world import World, hostfile_world, launcher_world, local_world, slurm_environment, slurm_world

__all__ = ["EXIT_DIVERGED", "main", "dry_run_report"]

#: Exit status of a run stopped by ``train.max_consecutive_skips``: a result of its recipe (a sweep
#: records it as diverged), not a failure of the program (1) or of its input (2).
EXIT_DIVERGED = 3

#: Where each rank's memory record lives, under the run directory (``rank_memory``).
RANK_RECORDS = "ranks"

NUM_CLASSES_NOTE = ("num_classes: taken from the data set at start-up (its categories + 1 background); "
                    "the model file's value ({}) is only a default")


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="agvm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (default: the built-in defaults)")
    parser.add_argument("--resume", help="'auto' (the run's last checkpoint, if any) or a checkpoint directory")
    parser.add_argument("--launcher", choices=("env", "slurm"), default="env",
                        help="where the ranks come from: 'env' (deepspeed, torchrun, or none: a world of one) "
                             "or 'slurm' (one srun task per rank)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved experiment config, model spec and DeepSpeed config (JSON) and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="print config, model, DeepSpeed config and world layout, then exit without training")
    layout = parser.add_argument_group("the launch a --dry-run describes (default: this process's launcher)")
    layout.add_argument("--hostfile", help="the world `deepspeed --hostfile PATH` would start")
    layout.add_argument("--num-nodes", "--num_nodes", type=int, default=0, help="with --hostfile: the first N hosts")
    layout.add_argument("--num-gpus", "--num_gpus", type=int, default=0, help="ranks per node")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    if not args.dry_run and (args.hostfile or args.num_nodes or args.num_gpus):
        parser.error("--hostfile/--num-nodes/--num-gpus describe a launch for --dry-run; "
                     "to launch, use launch/multinode.sh or launch/local.sh")
    return args


def _world(args: argparse.Namespace) -> World:
    if args.hostfile:
        return hostfile_world(args.hostfile, args.num_nodes, args.num_gpus)
    if args.launcher == "slurm":
        return slurm_world(os.environ)
    if "WORLD_SIZE" in os.environ:
        return launcher_world(os.environ)
    return local_world(args.num_gpus or 1)


def dry_run_report(config: ExperimentConfig, world: World) -> str:
    """What a run of ``config`` on ``world`` would build, without building it."""
    from ..engine.deepspeed_config import deepspeed_config
    from ..engine.schedule import peak_lr

    spec = experiment_spec(config)
    ds_config = deepspeed_config(config)
    per_rank, gas = config.data.batch_size_per_rank, ds_config["gradient_accumulation_steps"]
    global_batch = per_rank * world.ranks * gas
    if config.data.dataset == "synthetic":
        steps = (f"counted at start-up (at most {config.data.synthetic_train // global_batch}: "
                 f"{config.data.synthetic_train} synthetic images, those without boxes are dropped)")
    else:
        steps = f"counted at start-up from {config.data.train_ann} (images without annotations are dropped)"
    total = f"{config.train.max_iters} (train.max_iters)" if config.train.max_iters else \
        f"{config.train.epochs} epochs x steps per epoch"
    return "\n".join([
        "experiment config:", json.dumps(config.to_dict(), indent=2),
        f"model spec ({spec.name}):", json.dumps(spec.to_dict(), indent=2), NUM_CLASSES_NOTE.format(spec.num_classes),
        "DeepSpeed config:", json.dumps(ds_config, indent=2),
        f"world: {world.describe()}",
        f"batch: {per_rank} images per rank x {world.ranks} rank(s) x {gas} accumulation = global batch {global_batch}",
        f"peak lr: {peak_lr(config.optimizer, global_batch):.6g} ({config.optimizer.lr_scaling} scaling from "
        f"{config.optimizer.lr} at batch {config.optimizer.base_batch_size})",
        f"steps per epoch: {steps}",
        f"total steps: {total}",
    ])


def _user_error(error: Exception, every_rank: bool) -> int:
    """One line, no traceback, exit code 2."""
    _say(error, every_rank)
    return 2


def _say(error: Exception, every_rank: bool) -> None:
    """Config errors are the same on every rank, so rank 0 says them once; a failure while building
    the run may be one rank's own, so each failing rank says it."""
    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        print(f"agvm-train: {error}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        if args.launcher == "slurm" and "RANK" not in os.environ:
            os.environ.update(slurm_environment(os.environ))
        config = load_config(args.config, args.overrides)
        if args.print_config:
            from ..engine.deepspeed_config import deepspeed_config

            spec = experiment_spec(config)
            resolved = {"experiment": config.to_dict(), "model_spec": spec.to_dict(),
                        "deepspeed": deepspeed_config(config)}
            note = NUM_CLASSES_NOTE.format(spec.num_classes)
        if args.dry_run:
            report = dry_run_report(config, _world(args))
    except (ValueError, OSError) as error:
        return _user_error(error, every_rank=False)
    if args.print_config:
        print(json.dumps(resolved, indent=2))
        print(f"agvm-train: {note}", file=sys.stderr)
        return 0
    if args.dry_run:
        if int(os.environ.get("RANK", "0")) == 0:
            print(report)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    single_process_world()
    from ..engine.trainer import Trainer, TrainingDiverged

    try:
        trainer = Trainer(config, resume=args.resume)
    except (ValueError, OSError) as error:
        return _user_error(error, every_rank=True)
    try:
        metrics = _fit_or_name_lost_ranks(trainer)
    except TrainingDiverged as error:  # the same on every rank: rank 0 says it
        _say(error, every_rank=False)
        return EXIT_DIVERGED
    if metrics is None:
        return 1
    if trainer.is_main:
        print(json.dumps({"final": metrics}))
    import deepspeed.comm as dist

    dist.destroy_process_group()
    return 0


class _Terminated(Exception):
    """SIGTERM, as launchers send to the other ranks when one fails."""


def _raise_terminated(signum: int, frame) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _fit_or_name_lost_ranks(trainer) -> Optional[dict]:
    """``trainer.fit()``; if it fails because ranks died, one line naming them and None.

    Each rank records its memory in the run directory while it trains, so a peer that vanished
    without an error of its own (the out-of-memory killer's SIGKILL) is named with its last memory.
    A failure with every peer alive is re-raised (a bug keeps its traceback).
    """
    from tqdm import tqdm

    from ..engine.peers import PeerWatch
    from ..engine.rank_memory import RankMemory, describe_death, read_record

    peers = PeerWatch(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])) if trainer.world > 1 else None
    records = trainer.run_dir / RANK_RECORDS
    memory = RankMemory(records, trainer.rank, lambda: trainer.engine.global_steps)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        metrics = trainer.fit()
    except Exception as error:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cause = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        memory.close(f"{type(error).__name__}: {cause}")
        lost = peers.lost_ranks() if peers is not None else []
        if not lost and isinstance(error, _Terminated):
            raise SystemExit(128 + signal.SIGTERM) from None
        if not lost:
            raise
        deaths = "; ".join(filter(None, (describe_death(read_record(records, r), r) for r in lost)))
        tqdm.write(f"agvm-train: rank {trainer.rank}: rank(s) {', '.join(map(str, lost))} of {trainer.world} died "
                   f"(their process is gone), so the job stops ({cause}); restart it with --resume auto"
                   + (f". {deaths}" if deaths else ""), file=sys.stderr)
        return None
    memory.close("finished")
    return metrics

if __name__ == "__main__":
    raise SystemExit(main())
