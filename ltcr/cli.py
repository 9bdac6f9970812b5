"""``ltcr-train``: train a team of C51 agents, one per rank.

    ltcr-train --config cartpole                                   # a world of one: a single agent
    torchrun --standalone --nproc_per_node 4 -m ltcr.cli --config cartpole transfer.distill=false
    deepspeed --num_gpus 4 --module ltcr.cli --config lunarlander  # (or an sbatch script exporting RANK etc.)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import load_config
from .trainer import Trainer


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="ltcr-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cartpole", help="a YAML file or a shipped config name (ltcr/configs)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's latest checkpoint, if any")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("overrides", nargs="*", help="key.sub=value (values parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"ltcr-train: {error}")
    Trainer(config, resume=args.resume).train()


if __name__ == "__main__":
    main()
