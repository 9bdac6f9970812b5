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
import resource
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


def run(source: Path, config: Path, output_dir: Path, steps: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (user + system) of one ``ltcr.cli`` process importing ``ltcr`` from ``source``.
    CPU time is the steadier of the two on a shared machine: other processes' load stretches only the wall-clock."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(source), str(REPO)])}
    check = subprocess.run([sys.executable, "-c", "import ltcr; print(ltcr.__file__)"], cwd=source, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(check).resolve().is_relative_to(source.resolve()), (check, source)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ltcr.cli", "--config", str(config), f"output_dir={output_dir}",
                    f"train.steps={steps}", f"train.checkpoint_interval={steps}"],
                   cwd=source, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
        measured = {name: {"wall": [], "cpu": [], "start_wall": [], "start_cpu": []} for name in sources}
        returns = {}
        for repeat in range(args.repeats):
            for name, source in sources.items():
                m = measured[name]
                start_wall, start_cpu = run(source, config, tmp / f"{name}_start{repeat}", 1)
                out = tmp / f"{name}{repeat}"
                wall, cpu = run(source, config, out, args.steps)
                for key, value in (("wall", wall), ("cpu", cpu), ("start_wall", start_wall), ("start_cpu", start_cpu)):
                    m[key].append(value)
                returns.setdefault(name, []).append(last_return(out))
                print(f"repeat {repeat} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU (start-up {start_wall:.1f} s wall, "
                      f"{start_cpu:.1f} s CPU), last greedy return {returns[name][-1]:.1f}", flush=True)
        rate = {}
        print(f"\n{args.steps} steps of CartPole-v1, cartpole_cleanrl settings; before = {args.before}, "
              f"after = this tree; median of {args.repeats}; steps/s net of start-up (a 1-step run)")
        print(f"{'':8}{'wall s':>9}{'CPU s':>9}{'start-up wall s':>17}{'steps/s (wall)':>16}{'steps/s (CPU)':>15}")
        for name in sources:
            m = {key: statistics.median(values) for key, values in measured[name].items()}
            rate[name] = (args.steps / max(m["wall"] - m["start_wall"], 1e-9),
                          args.steps / max(m["cpu"] - m["start_cpu"], 1e-9))
            print(f"{name:8}{m['wall']:9.1f}{m['cpu']:9.1f}{m['start_wall']:17.1f}{rate[name][0]:16.0f}"
                  f"{rate[name][1]:15.0f}")
        print(f"ratio after/before: {rate['after'][0] / rate['before'][0]:.2f}x (wall), "
              f"{rate['after'][1] / rate['before'][1]:.2f}x (CPU)")
        components(tmp / "after0")


def components(run_dir: Path) -> None:
    """Where a step's time goes, in this process (one thread), with the network ``run_dir`` ended with: acting on
    one observation (torch batch-1 forward, the earlier path, against the numpy one), a greedy evaluation of 10
    episodes (one episode after another against batched on a vector env) and one gradient step."""
    sys.path.insert(0, str(REPO))
    import gymnasium as gym
    import numpy as np
    import torch

    from ltcr.agent import C51Agent
    from ltcr.config import load_config
    from ltcr.envs import evaluate, evaluate_batched, make_eval_envs

    torch.set_num_threads(1)
    config = load_config(run_dir / "config.yaml")
    agent = C51Agent(config.agent, 4, 2, *config.support, seed=0, device=torch.device("cpu"))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    agent.load_state_dict(torch.load(run_dir / "checkpoints" / latest / "rank0.pt", weights_only=False)["agent"])
    obs = np.zeros(4, np.float32)

    def per_call(function, count: int) -> float:
        function()
        start = time.perf_counter()
        for _ in range(count):
            function()
        return (time.perf_counter() - start) / count

    torch_act = per_call(lambda: int(agent.greedy_actions(obs[None])[0]), 5000)
    numpy_act = per_call(lambda: agent.greedy_action(obs), 5000)
    env, envs = gym.make(config.env), make_eval_envs(config.env, 10)
    one_by_one = per_call(lambda: evaluate(env, lambda o: int(agent.greedy_actions(o[None])[0]), 10, 0, 0, 2, 0), 3)
    batched = per_call(lambda: evaluate_batched(envs, agent.greedy_actions, 0, 0, 2, 0), 3)
    train = per_call(lambda: agent.train_step(0.0), 300)
    print(f"\ncomponents (this tree, one thread), final network, evaluation return "
          f"{evaluate_batched(envs, agent.greedy_actions, 0, 0, 2, 0):.1f}:")
    print(f"  act on one observation: torch {torch_act * 1e6:.1f} us, numpy {numpy_act * 1e6:.1f} us "
          f"({torch_act / numpy_act:.2f}x)")
    print(f"  greedy evaluation, 10 episodes: one by one {one_by_one * 1e3:.0f} ms, batched {batched * 1e3:.0f} ms "
          f"({one_by_one / batched:.2f}x)")
    print(f"  gradient step (batch {config.agent.batch_size}): {train * 1e3:.2f} ms, i.e. "
          f"{train * 1e6 / config.agent.train_every:.0f} us per env step at train_every={config.agent.train_every}")

if __name__ == "__main__":
    main()
