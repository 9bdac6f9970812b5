"""``agvm-export``: a run's checkpoint as one safetensors file that loads without DeepSpeed.

    agvm-export RUN_DIR [--checkpoint TAG] --out model.safetensors [--dtype bf16]
    python -c "import agvm_ds; model = agvm_ds.load_detector('model.safetensors')"

The weights are the checkpoint's fp32 master weights merged across ranks by DeepSpeed's
``zero_to_fp32`` (any ZeRO stage, any world size), with the BatchNorm statistics; the file's
metadata holds the resolved model spec and the class names (see :mod:`agvm_ds.detection.weights`).
``--dtype bf16`` stores the weights in bf16: half the size (2 GB for the 1B SwinV2 detector).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from ..detection.weights import EXPORT_DTYPES, save_detector
from ..engine.trained_run import TrainedRun, command_parser, consolidated_state_dict
from ..errors import add_exit_codes, run_command

__all__ = ["export", "main"]


def export(run_dir: Union[str, Path], out: Union[str, Path], tag: Optional[str] = None, dtype: str = "fp32") -> Path:
    """Writes checkpoint ``tag`` (default: the newest complete one) of ``run_dir`` to ``out``, floats as ``dtype``."""
    run = TrainedRun.open(run_dir, tag)
    state_dict = consolidated_state_dict(run.checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_detector(out, state_dict, run.spec, run.categories, dtype, checkpoint=str(run.checkpoint.path),
                  zero_stage=run.checkpoint.zero_stage, world_size=run.checkpoint.world_size)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_exit_codes(command_parser("agvm-export", __doc__))
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--dtype", choices=tuple(EXPORT_DTYPES), default="fp32",
                        help="the stored weights' precision (bf16: half the file; loaded back into fp32)")
    args = parser.parse_args(argv)

    def run() -> int:
        out = export(args.run_dir, args.out, args.checkpoint, args.dtype)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype})")
        return 0

    return run_command("agvm-export", run)


if __name__ == "__main__":
    sys.exit(main())
