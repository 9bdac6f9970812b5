"""Independent C51 vs experience sharing vs distillation vs full LTCR: team-mean return against environment steps.

    python benchmarks/ltcr_compare.py --env CartPole-v1 --seeds 0 1 2 [--steps 20000] [key=value ...]
    python benchmarks/ltcr_compare.py --env CartPole-v1 --recipe cleanrl --steps 500000 --out runs/ltcr_cleanrl_teams
    python benchmarks/ltcr_compare.py --env CartPole-v1 --seeds 0 1 2 --report-only

Each (environment, variant, seed) is one team of ``--agents`` ranks started with torchrun
(``python -m torch.distributed.run --standalone``), trained by ``ltcr.cli`` from the shipped config of the
environment (``--recipe``: the heterogeneous ``team`` configs, or the ``cleanrl`` ones, whose single agents solve
CartPole and Acrobot) plus the variant's switches and any ``key=value`` overrides. A finished run (its ``latest``
checkpoint is the last step) is skipped; an interrupted one resumes from its checkpoint. Afterwards the evaluation
returns of every environment under ``<out>`` are gathered into ``<out>/results.md``, ``<out>/results.csv`` and
``<out>/team_return.png``, per variant with the mean and spread over seeds: the area under the curve (the mean team
return over all evaluations, i.e. the normalised AUC), the final team return, the environment steps per agent at
which the team mean, and at which the team's first agent, first reach the solved threshold, the share of the last
half's evaluations whose team mean is at or above it (does the team stay solved), the transfer bytes each agent
sent, for distilling teams the share of states taught by the team's best and by its worst agent (whom the teacher
rule picks), and the entropy and expected value of the agents' greedy-action distributions at the end.
``--variants ltcr-return`` adds our variant of the protocol: full LTCR with the teacher chosen by recent episode
return instead of by the entropy of its distribution.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ltcr.agent import C51Agent  # noqa: E402
from ltcr.config import load_config  # noqa: E402
from ltcr.envs import ENVIRONMENTS, Episodes  # noqa: E402
from ltcr.logs import read_metrics  # noqa: E402

RECIPES = {  # recipe: the shipped config of each environment
    "team": {"CartPole-v1": "cartpole", "Acrobot-v1": "acrobot", "MountainCar-v0": "mountaincar",
             "LunarLander-v3": "lunarlander"},
    "cleanrl": {"CartPole-v1": "cartpole_cleanrl", "Acrobot-v1": "acrobot_cleanrl"},
}
ENVS = sorted({env for configs in RECIPES.values() for env in configs})
VARIANTS = {
    "independent": ["transfer.share_experience=false", "transfer.distill=false"],
    "sharing": ["transfer.share_experience=true", "transfer.distill=false"],
    "distillation": ["transfer.share_experience=false", "transfer.distill=true"],
    "ltcr": ["transfer.share_experience=true", "transfer.distill=true", "transfer.teacher=confidence"],
    # ours: the teacher chosen by evidence of competence (best recent episode return), not by how peaked its
    # distribution is; not run unless asked for with --variants
    "ltcr-return": ["transfer.share_experience=true", "transfer.distill=true", "transfer.teacher=return"],
}
DEFAULT_VARIANTS = ["independent", "sharing", "distillation", "ltcr"]
PROBE_STATES = 512


def run_dir(out: Path, env: str, variant: str, seed: int) -> Path:
    return out / env / variant / f"seed{seed}"


def is_finished(folder: Path, steps: int | None = None) -> bool:
    """Whether the run reached ``steps`` (default: the ``train.steps`` it was started with)."""
    latest, config = folder / "checkpoints" / "latest", folder / "config.yaml"
    if steps is None and config.is_file():
        steps = yaml.safe_load(config.read_text())["train"]["steps"]
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:09d}"


def train(env: str, variant: str, seed: int, args: argparse.Namespace) -> None:
    folder = run_dir(args.out, env, variant, seed)
    if is_finished(folder, args.steps):
        print(f"skip (finished): {folder}", flush=True)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.agents}",
               "-m", "ltcr.cli", "--config", RECIPES[args.recipe][env], "--resume", *VARIANTS[variant], *args.overrides,
               f"seed={seed}", f"output_dir={folder}", f"train.steps={args.steps}", "train.progress=false"]
    print("run:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Evaluation return against steps per agent, of each agent ("0", "1", ...) and of the team mean ("team")."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(folder / "metrics.csv"):
        out.setdefault(r["agent"], []).append((int(r["step"]), float(r["eval_return"])))
    return out


def first_reaching(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((step for step, value in curve if value >= threshold), None)


def first_agent_reaching(run: dict[str, list[tuple[int, float]]], threshold: float) -> int | None:
    """Steps per agent at which the team's first agent reached ``threshold`` (None: no agent did)."""
    hits = [first_reaching(curve, threshold) for agent, curve in run.items() if agent != "team"]
    return min((h for h in hits if h is not None), default=None)


def teacher_shares(folder: Path) -> tuple[float, float] | None:
    """Mean share of the round's states taught by the team's best and by its worst agent (by greedy return at the
    evaluation that closes the rounds), over the evaluations whose agents' returns differ; None without the log
    of a distilling team. With 4 agents, 0.25 each is a teacher rule blind to how good the agents are."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for r in read_metrics(folder / "metrics.csv"):
        if r["agent"] != "team" and r.get("taught_share"):
            rows.setdefault(r["step"], []).append((float(r["eval_return"]), float(r["taught_share"])))
    best, worst = [], []
    for agents in rows.values():
        returns = [value for value, _ in agents]
        if max(returns) > min(returns):
            best.append(statistics.fmean(share for value, share in agents if value == max(returns)))
            worst.append(statistics.fmean(share for value, share in agents if value == min(returns)))
    return (statistics.fmean(best), statistics.fmean(worst)) if best else None


def final_outlook(folder: Path) -> tuple[float, float] | None:
    """What the confidence rule reads (entropy) beside what it should care about (expected return): the mean over
    the agents, at the run's last checkpoint, of the entropy and of the expected value of each agent's greedy-action
    distribution on ``PROBE_STATES`` states drawn from its own replay buffer; None without agent checkpoints."""
    checkpoint = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    ranks = sorted(checkpoint.glob("rank*.pt"))
    if not ranks:
        return None
    config = load_config(folder / "config.yaml")
    spaces = Episodes(config.env, config.seed, 0)
    obs_dim, n_actions = spaces.obs_dim, spaces.n_actions
    entropies, values = [], []
    for path in ranks:
        agent = C51Agent(config.agent_for(int(path.stem.removeprefix("rank"))), obs_dim, n_actions, *config.support,
                         seed=0, device=torch.device("cpu"))
        agent.load_state_dict(torch.load(path, weights_only=False)["agent"])
        states = agent.replay.gather(np.random.default_rng(0).integers(len(agent.replay), size=PROBE_STATES)).obs
        outlook = agent.outlook(torch.as_tensor(states))
        entropies.append(outlook.entropy.mean().item())
        values.append((outlook.probs @ agent.online.support).mean().item())
    return statistics.fmean(entropies), statistics.fmean(values)


def sent_bytes(folder: Path) -> float:
    """Transfer bytes each agent sent over the whole run (the team mean of the agents' totals)."""
    team = [r for r in read_metrics(folder / "metrics.csv") if r["agent"] == "team" and r["bytes_total"]]
    return float(team[-1]["bytes_total"]) if team else 0.0


def summarize(env: str, args: argparse.Namespace) -> list[dict]:
    threshold = ENVIRONMENTS[env].solved
    rows = []
    for variant in VARIANTS:
        folders = [run_dir(args.out, env, variant, s) for s in args.seeds]
        folders = [f for f in folders if is_finished(f)]
        if not folders:
            continue
        runs = [curves(f) for f in folders]
        teams = [run["team"] for run in runs]
        aucs = [statistics.fmean(v for _, v in c) for c in teams]
        finals = [c[-1][1] for c in teams]
        reached = [h for h in (first_reaching(c, threshold) for c in teams) if h is not None]
        firsts = [h for h in (first_agent_reaching(run, threshold) for run in runs) if h is not None]
        held = [statistics.fmean(v >= threshold for _, v in c[len(c) // 2:]) for c in teams]
        sent = [sent_bytes(f) for f in folders]
        shares = [t for t in (teacher_shares(f) for f in folders) if t is not None]
        outlooks = [o for o in (final_outlook(f) for f in folders) if o is not None]
        entropies, values = [e for e, _ in outlooks], [v for _, v in outlooks]
        rows.append({
            "env": env, "variant": variant, "seeds": len(teams), "steps_per_agent": teams[0][-1][0],
            "auc_mean": statistics.fmean(aucs), "auc_std": _std(aucs),
            "final_mean": statistics.fmean(finals), "final_std": _std(finals),
            "solved_threshold": threshold, "seeds_solved": len(reached),
            "steps_to_solved_mean": statistics.fmean(reached) if reached else "",
            "steps_to_solved_std": _std(reached) if reached else "",
            "first_agent_seeds": len(firsts), "first_agent_steps_mean": statistics.fmean(firsts) if firsts else "",
            "first_agent_steps_std": _std(firsts) if firsts else "",
            "last_half_solved_mean": statistics.fmean(held), "last_half_solved_std": _std(held),
            "bytes_per_agent_mean": statistics.fmean(sent), "bytes_per_agent_std": _std(sent),
            "best_agent_taught": statistics.fmean(b for b, _ in shares) if shares else "",
            "worst_agent_taught": statistics.fmean(w for _, w in shares) if shares else "",
            "entropy_end_mean": statistics.fmean(entropies) if outlooks else "", "entropy_end_std": _std(entropies),
            "value_end_mean": statistics.fmean(values) if outlooks else "", "value_end_std": _std(values),
            "curves": teams})
    return rows


def write_report(rows: list[dict], out: Path) -> None:
    columns = ["env", "variant", "seeds", "steps_per_agent", "auc_mean", "auc_std", "final_mean", "final_std",
               "solved_threshold", "seeds_solved", "steps_to_solved_mean", "steps_to_solved_std", "first_agent_seeds",
               "first_agent_steps_mean", "first_agent_steps_std", "last_half_solved_mean", "last_half_solved_std",
               "bytes_per_agent_mean", "bytes_per_agent_std", "best_agent_taught", "worst_agent_taught",
               "entropy_end_mean", "entropy_end_std", "value_end_mean", "value_end_std"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| env | variant | seeds | steps/agent | AUC (mean team return) | final team return | "
             "team mean reaches threshold: seeds, steps | first agent reaches it: seeds, steps | "
             "last half at threshold | MB sent per agent | share taught by the best / worst agent | "
             "greedy-action distribution at the end: entropy (nats), expected value |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['env']} | {r['variant']} | {r['seeds']} | {r['steps_per_agent']} | "
                     f"{r['auc_mean']:.1f} +- {r['auc_std']:.1f} | {r['final_mean']:.1f} +- {r['final_std']:.1f} | "
                     f"{r['seeds_solved']}/{r['seeds']} (>= {r['solved_threshold']:g}), "
                     f"{_steps(r['steps_to_solved_mean'], r['steps_to_solved_std'])} | "
                     f"{r['first_agent_seeds']}/{r['seeds']}, "
                     f"{_steps(r['first_agent_steps_mean'], r['first_agent_steps_std'])} | "
                     f"{r['last_half_solved_mean']:.2f} +- {r['last_half_solved_std']:.2f} | "
                     f"{r['bytes_per_agent_mean'] / 1e6:.2f} +- {r['bytes_per_agent_std'] / 1e6:.2f} | "
                     f"{_shares(r['best_agent_taught'], r['worst_agent_taught'])} | "
                     f"{_outlook(r)} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    envs = sorted({r["env"] for r in rows})
    fig, axes = plt.subplots(1, len(envs), figsize=(7 * len(envs), 4.5), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for r in (r for r in rows if r["env"] == env):
            steps = sorted(set.intersection(*(set(s for s, _ in c) for c in r["curves"])))
            values = [[dict(c)[s] for c in r["curves"]] for s in steps]
            mean = [statistics.fmean(v) for v in values]
            ax.plot(steps, mean, label=f"{r['variant']} (n={r['seeds']})")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
        ax.axhline(ENVIRONMENTS[env].solved, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{env}: team-mean return, mean and min-max over seeds")
        ax.set_xlabel("environment steps per agent")
        ax.set_ylabel("greedy evaluation return")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "team_return.png", dpi=100)


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _outlook(row: dict) -> str:
    if row["entropy_end_mean"] == "":
        return "-"
    return (f"{row['entropy_end_mean']:.2f} +- {row['entropy_end_std']:.2f}, "
            f"{row['value_end_mean']:.1f} +- {row['value_end_std']:.1f}")


def _shares(best: float | str, worst: float | str) -> str:
    return f"{best:.2f} / {worst:.2f}" if best != "" else "-"


def _steps(mean: float | str, std: float | str) -> str:
    return f"{mean:,.0f} +- {std:,.0f}" if mean != "" else "not reached"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", choices=ENVS, required=True)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="team",
                        help="the shipped configs: 'team' (heterogeneous 4-agent teams) or 'cleanrl' (CleanRL's "
                             "c51.py settings, CartPole and Acrobot)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20_000, help="environment steps per agent")
    parser.add_argument("--out", type=Path, default=Path("runs/ltcr_compare"))
    parser.add_argument("--report-only", action="store_true", help="summarise finished runs, train nothing")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run (ltcr-train syntax)")
    args = parser.parse_args(argv)
    missing = [env for env in args.env if env not in RECIPES[args.recipe]]
    if missing:
        parser.error(f"--recipe {args.recipe} has no config for {', '.join(missing)}; "
                     f"it has {', '.join(RECIPES[args.recipe])}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        for env in args.env:
            for seed in args.seeds:  # seed-major: an early stop still leaves every variant with equal seeds
                for variant in args.variants:
                    train(env, variant, seed, args)
    args.out.mkdir(parents=True, exist_ok=True)  # the report covers every environment run so far under --out
    reported = [env for env in ENVS if env in args.env or (args.out / env).is_dir()]
    write_report([row for env in reported for row in summarize(env, args)], args.out)


if __name__ == "__main__":
    main()
