"""Single-agent training speed of ``ltcr``: this tree against an earlier revision, side by side in one run.

    python benchmarks/ltcr_agent_speed.py [--before 85bd121] [--steps 60000] [--repeats 2]

The earlier revision's ``ltcr/`` is extracted with ``git archive`` into a temporary folder; both are then run as
``python -m ltcr.cli`` processes (one thread each, alternating before/after so that a change in the machine's
load hits both) on the same config: CartPole-v1 with the ``cartpole_cleanrl`` settings shrunk to ``--steps``
(exploration over the first half, as in the full run; greedy evaluation over 10 episodes every 5,000 steps; one
checkpoint at the end), restricted to the keys both revisions know. It prints, per revision, the whole process's
wall-clock, the start-up (a 1-step run of the same config), steps/s with and without start-up, the last greedy
return (a check that both trained the same algorithm), and the after/before ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BEFORE = "85bd121"  # the last revision before the single-agent fast path (batched evaluation, in-place replay)
NEW_KEYS = ("adam_eps", "grad_clip")  # agent keys the earlier revision does not know


def write_config(folder: Path, steps: int) -> Path:
    config = yaml.safe_load((REPO / "ltcr" / "configs" / "cartpole_cleanrl.yaml").read_text())
    for key in NEW_KEYS:
        config["agent"].pop(key, None)
    config["agent"]["eps_decay_steps"] = steps // 2
    config["train"] = {"steps": steps, "eval_interval": 5000, "eval_episodes": 10, "checkpoint_interval": steps,
                       "progress": False}
    path = folder / "speed.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(source: Path, config: Path, output_dir: Path, steps: int) -> float:
    """Wall-clock seconds of one ``ltcr.cli`` process importing ``ltcr`` from ``source``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(source), str(REPO)])}
    check = subprocess.run([sys.executable, "-c", "import ltcr; print(ltcr.__file__)"], cwd=source, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(check).resolve().is_relative_to(source.resolve()), (check, source)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ltcr.cli", "--config", str(config), f"output_dir={output_dir}",
                    f"train.steps={steps}", f"train.checkpoint_interval={steps}"],
                   cwd=source, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def last_return(output_dir: Path) -> float:
    rows = [line.split(",") for line in (output_dir / "metrics.csv").read_text().splitlines()[1:]]
    return float([r for r in rows if r[1] == "team"][-1][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare against")
    parser.add_argument("--steps", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ltcr_speed_") as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "ltcr"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        config = write_config(tmp, args.steps)
        sources = {"before": old, "after": REPO}
        walls = {name: [] for name in sources}
        startup = {name: [] for name in sources}
        returns = {}
        for repeat in range(args.repeats):
            for name, source in sources.items():
                startup[name].append(run(source, config, tmp / f"{name}_start{repeat}", 1))
                out = tmp / f"{name}{repeat}"
                walls[name].append(run(source, config, out, args.steps))
                returns.setdefault(name, []).append(last_return(out))
                print(f"repeat {repeat} {name}: {walls[name][-1]:.1f} s (start-up {startup[name][-1]:.1f} s), "
                      f"last greedy return {returns[name][-1]:.1f}", flush=True)
        rate = {}
        print(f"\n{args.steps} steps of CartPole-v1, cartpole_cleanrl settings; before = {args.before}, "
              f"after = this tree; median of {args.repeats}")
        print(f"{'':8}{'wall s':>9}{'start-up s':>12}{'steps/s':>10}{'steps/s w/o start-up':>23}")
        for name in sources:
            wall, start = statistics.median(walls[name]), statistics.median(startup[name])
            rate[name] = (args.steps / wall, args.steps / max(wall - start, 1e-9))
            print(f"{name:8}{wall:9.1f}{start:12.1f}{rate[name][0]:10.0f}{rate[name][1]:23.0f}")
        print(f"ratio after/before: {rate['after'][0] / rate['before'][0]:.2f}x "
              f"({rate['after'][1] / rate['before'][1]:.2f}x without start-up)")


if __name__ == "__main__":
    main()
