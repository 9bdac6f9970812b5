"""``agvm-train``: train a detector from an experiment config, on one process or many.

    agvm-train --config configs/synthetic_tiny.yaml [--resume auto] [key.sub=value ...]
    deepspeed --num_gpus 8 --module agvm_ds.engine.cli --config configs/coco_faster_rcnn_r50_bs256.yaml

Run as a single process (no launcher), it sets up a world of one on its own. ``--print-config``
prints the resolved configuration and exits.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

from .config import load_config

__all__ = ["main"]


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="agvm-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML (default: the built-in defaults)")
    parser.add_argument("--resume", help="'auto' (the run's last checkpoint, if any) or a checkpoint directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def _single_process_world() -> None:
    """Lets ``deepspeed.init_distributed`` build a world of one when no launcher set one up."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (FileNotFoundError, ValueError) as error:
        print(f"agvm-train: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _single_process_world()
    from .trainer import Trainer

    metrics = Trainer(config, resume=args.resume).fit()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final": metrics}))
    import deepspeed.comm as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
