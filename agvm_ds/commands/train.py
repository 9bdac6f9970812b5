"""``agvm-train``: train a detector from an experiment config, on one process or many.

    agvm-train --config configs/synthetic_tiny.yaml [--resume auto] [key.sub=value ...]
    deepspeed --num_gpus 8 --no_local_rank --module agvm_ds.commands.train \
        --config configs/coco_faster_rcnn_r50_bs256.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m agvm_ds.commands.train ...
    srun python -m agvm_ds.commands.train --launcher slurm ...

Run as a single process (no launcher), it sets up a world of one on its own. ``--launcher slurm``
maps the Slurm task's SLURM_* variables to the ones torch.distributed reads. ``--print-config``
prints the resolved configuration; ``--dry-run`` prints the configuration, the model, the DeepSpeed
config and the world layout (of this launch, or of ``--hostfile``/``--num-gpus``), and exits.

A run holds its output_dir (``run.lock``) while it trains: a second job on it is refused. A resume
may change epochs, intervals and the lr schedule, not the model, the optimizer or the classes
(each start is kept in ``config_history.jsonl``). See docs/faults.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Optional, Sequence

from ..engine.config import ExperimentConfig, load_config
from ..engine.distributed import single_process_world
from ..engine.model_spec import experiment_spec
from ..engine.world import World, hostfile_world, launcher_world, local_world, slurm_environment, slurm_world
from ..errors import ExitCode, OutsideFault, PeerFailed, add_exit_codes, classify, report

__all__ = ["EXIT_DIVERGED", "main", "dry_run_report"]

#: Exit status of a run stopped by ``train.max_consecutive_skips``: a result of its recipe (a sweep
#: records it as diverged), not a failure of the program (1) or of its input (2).
EXIT_DIVERGED = int(ExitCode.DIVERGED)
PROG = "agvm-train"

#: Where each rank's memory record lives, under the run directory (``rank_memory``).
RANK_RECORDS = "ranks"
#: How long a rank whose collective failed waits before asking again which peers are gone (a peer
#: that failed on its own is still reporting its error when the others notice), and before it exits
#: (so that the launcher, which exits with the status of the first rank to end, reports the cause).
PEER_EXIT_GRACE_S = 2.0

NUM_CLASSES_NOTE = ("num_classes: taken from the data set at start-up (its categories + 1 background; a semantic "
                    "model's: its classes; a panoptic model's num_stuff_classes: its stuff categories); the model "
                    "file's value ({}) is only a default")


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
    add_exit_codes(parser)
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
    dropped = ", those without boxes are dropped" if spec.task in ("detection", "instance") else ""
    if config.data.dataset == "synthetic":
        steps = (f"counted at start-up (at most {config.data.synthetic_train // global_batch}: "
                 f"{config.data.synthetic_train} synthetic images{dropped})")
    else:
        source = {"ade20k": config.data.root, "semantic_folder": config.data.train_images}.get(
            config.data.dataset, config.data.train_ann)
        steps = f"counted at start-up from {source}" + (" (images without annotations are dropped)" if dropped else "")
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
    """One line naming the cause (no traceback unless --debug) and its exit code (``agvm_ds.errors``);
    an error that is a bug is re-raised with its traceback.

    Config errors are the same on every rank, so rank 0 says them once; a failure while building or
    training the run may be one rank's own, so each failing rank says it, prefixed by its rank."""
    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        code = report(PROG, error, f"rank {os.environ.get('RANK', '0')}: " if world > 1 else "")
        if code == ExitCode.PEER_FAILED:  # let the rank that failed first end first: launchers exit with its status
            time.sleep(PEER_EXIT_GRACE_S)
        return code
    known = classify(error)
    if known is None:
        raise error
    return int(known[0])


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
    except Exception as error:  # noqa: BLE001 - a bug is re-raised with its traceback
        return _user_error(error, every_rank=True)
    try:
        metrics = _fit_or_name_lost_ranks(trainer)
    except TrainingDiverged as error:  # the same on every rank: rank 0 says it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except Exception as error:  # noqa: BLE001 - a bug is re-raised with its traceback
        return _user_error(error, every_rank=True)
    if trainer.is_main:
        print(json.dumps({"final": metrics}))
    import deepspeed.comm as dist

    dist.destroy_process_group()
    return 0


class _Terminated(Exception):
    """SIGTERM, as launchers send to the other ranks when one fails."""


def _raise_terminated(signum: int, frame) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _fit_or_name_lost_ranks(trainer) -> dict:
    """``trainer.fit()``; if it fails because ranks died, PeerFailed naming them.

    Each rank records its memory in the run directory while it trains, so a peer that vanished
    without an error of its own (the out-of-memory killer's SIGKILL) is named with its last memory.
    A failure with every peer alive is re-raised: an outside fault of this rank is reported as one
    line, a bug keeps its traceback. A collective that failed because a peer is exiting (it is
    still printing its own error) is probed again a moment later.
    """
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
        with contextlib.suppress(OSError):  # the record is a witness: a full disk must not hide the cause
            memory.close(f"{type(error).__name__}: {cause}")
        if isinstance(error, OutsideFault):  # this rank's own outside cause, or a peer failure it has named
            raise
        lost = peers.lost_ranks() if peers is not None else []
        if not lost and peers is not None and (classify(error) or (None,))[0] == ExitCode.PEER_FAILED:
            time.sleep(PEER_EXIT_GRACE_S)
            lost = peers.lost_ranks()
        if not lost and isinstance(error, _Terminated):
            raise SystemExit(128 + signal.SIGTERM) from None
        if not lost:
            raise
        deaths = "; ".join(filter(None, (describe_death(read_record(records, r), r) for r in lost)))
        raise PeerFailed(f"rank(s) {', '.join(map(str, lost))} of {trainer.world} died (their process is gone), so "
                         f"the job stops ({cause}); restart it with --resume auto"
                         + (f". {deaths}" if deaths else "")) from error
    memory.close("finished")
    return metrics

if __name__ == "__main__":
    raise SystemExit(main())
