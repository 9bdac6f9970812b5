"""``agvm-export``: a run's checkpoint as one safetensors file that loads without DeepSpeed.

    agvm-export RUN_DIR [--checkpoint TAG] --out model.safetensors
    python -c "import agvm_ds; model = agvm_ds.load_detector('model.safetensors')"

The weights are the checkpoint's fp32 master weights merged across ranks by DeepSpeed's
``zero_to_fp32`` (any ZeRO stage, any world size), with the BatchNorm statistics; the file's
metadata holds the resolved model spec and the class names (see :mod:`agvm_ds.detection.weights`).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from ..detection.weights import save_detector
from .trained_run import TrainedRun, command_parser, consolidated_state_dict

__all__ = ["export", "main"]


def export(run_dir: Union[str, Path], out: Union[str, Path], tag: Optional[str] = None) -> Path:
    """Writes checkpoint ``tag`` (default: the newest complete one) of ``run_dir`` to ``out``."""
    run = TrainedRun.open(run_dir, tag)
    state_dict = consolidated_state_dict(run.checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_detector(out, state_dict, run.spec, run.categories, checkpoint=str(run.checkpoint.path),
                  zero_stage=run.checkpoint.zero_stage, world_size=run.checkpoint.world_size)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = command_parser("agvm-export", __doc__)
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"agvm-export: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
