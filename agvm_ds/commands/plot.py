"""``agvm-plot RUN_DIR``: the PNG plots of a run (see :mod:`agvm_ds.engine.plots`), e.g. of one still training."""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..engine import plots
from ..errors import add_exit_codes, run_command

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="agvm-plot", description=plots.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run's output_dir (holds train_log.jsonl / eval_log.jsonl)")
    args = add_exit_codes(parser).parse_args(argv)

    def run() -> int:
        for path in plots.plot_run(args.run_dir):
            print(path)
        return 0

    return run_command("agvm-plot", run)


if __name__ == "__main__":
    raise SystemExit(main())
