"""benchmarks/ltcr_compare.py: the team comparison's report (steps to the threshold for the team mean and the first
agent, staying solved, bytes) on hand-written logs, and one real 2-agent comparison that resumes by skipping."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import ltcr_compare  # noqa: E402

FIELDS = ["step", "agent", "eval_return", "train_return", "distill_loss", "bytes_per_round", "bytes_total", "epsilon",
          "taught_share"]


def _fake_run(folder: Path, steps: int, agents: list[list[float]], bytes_total: float,
              taught: list[list[float]] | None = None) -> None:
    """A finished run's files: ``agents[a][k]`` is agent a's return at evaluation k (every 100 steps), ``taught[a][k]``
    its share of the states taught in the rounds before it."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "latest").write_text(f"step_{steps:09d}")
    (folder / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": steps}}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for k, values in enumerate(zip(*agents)):
            step = 100 * (k + 1)
            for agent, value in enumerate(values):
                writer.writerow([step, agent, value, "", "", "", bytes_total, "", taught[agent][k] if taught else ""])
            writer.writerow([step, "team", sum(values) / len(values), "", "", "", bytes_total, "", ""])


def test_report_counts_the_team_and_its_first_agent_reaching_the_threshold(tmp_path):
    out = tmp_path / "cmp"
    # seed 0: agent 1 reaches 475 at step 200, the team mean at 300 and it stays there
    _fake_run(out / "CartPole-v1/ltcr/seed0", 400, [[100, 300, 500, 500], [200, 480, 500, 500]], 2e6)
    # seed 1: agent 0 reaches 475 at step 400, the team mean never does
    _fake_run(out / "CartPole-v1/ltcr/seed1", 400, [[100, 200, 300, 475], [100, 100, 100, 100]], 4e6)
    args = ltcr_compare.parse_args(["--env", "CartPole-v1", "--seeds", "0", "1", "--out", str(out), "--report-only"])
    [row] = ltcr_compare.summarize("CartPole-v1", args)
    assert (row["variant"], row["seeds"], row["steps_per_agent"]) == ("ltcr", 2, 400)
    assert (row["seeds_solved"], row["steps_to_solved_mean"]) == (1, 300)
    assert (row["first_agent_seeds"], row["first_agent_steps_mean"]) == (2, 300)  # 200 and 400
    assert row["last_half_solved_mean"] == pytest.approx(0.5)  # seed 0: 2 of 2, seed 1: 0 of 2
    assert row["bytes_per_agent_mean"] == pytest.approx(3e6)
    assert row["final_mean"] == pytest.approx((500 + 287.5) / 2)


def test_report_shows_whom_the_teacher_rule_picks(tmp_path):
    out = tmp_path / "cmp"
    # evaluation 1: agent 1 is best and taught 0.9; evaluation 2: tie (skipped); evaluation 3: agent 0 best, taught 0.3
    _fake_run(out / "CartPole-v1/ltcr/seed0", 300, [[100, 500, 500], [200, 500, 400]], 1e6,
              taught=[[0.1, 0.5, 0.3], [0.9, 0.5, 0.7]])
    _fake_run(out / "CartPole-v1/independent/seed0", 300, [[100, 500, 500], [200, 500, 400]], 0)
    args = ltcr_compare.parse_args(["--env", "CartPole-v1", "--seeds", "0", "--out", str(out), "--report-only"])
    rows = {r["variant"]: r for r in ltcr_compare.summarize("CartPole-v1", args)}
    assert rows["ltcr"]["best_agent_taught"] == pytest.approx((0.9 + 0.3) / 2)
    assert rows["ltcr"]["worst_agent_taught"] == pytest.approx((0.1 + 0.7) / 2)
    assert rows["independent"]["best_agent_taught"] == ""


def test_a_recipe_without_a_config_for_the_environment_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ltcr_compare.parse_args(["--env", "LunarLander-v3", "--recipe", "cleanrl"])
    assert exit_info.value.code == 2
    message = "--recipe cleanrl has no config for LunarLander-v3; it has CartPole-v1, Acrobot-v1"
    assert message in capsys.readouterr().err


def test_a_real_comparison_trains_the_cleanrl_recipe_reports_and_skips_finished_teams(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--env", "CartPole-v1", "--recipe", "cleanrl", "--agents", "2", "--seeds", "0", "--variants",
            "independent", "ltcr", "--steps", "300", "--out", str(out), "train.eval_interval=150",
            "train.eval_episodes=1", "train.checkpoint_interval=150", "agent.learning_starts=128",
            "agent.train_every=4", "transfer.interval=50"]
    ltcr_compare.main(argv)
    config = yaml.safe_load((out / "CartPole-v1/ltcr/seed0/config.yaml").read_text())
    assert config["agent"]["atoms"] == 101 and config["agent"]["lr"] == 0.00025  # cartpole_cleanrl, not cartpole
    rows = {r["variant"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"independent", "ltcr"} and rows["ltcr"]["steps_per_agent"] == "300"
    assert float(rows["independent"]["bytes_per_agent_mean"]) == 0 < float(rows["ltcr"]["bytes_per_agent_mean"])
    for row in rows.values():  # the agents' final greedy-action distributions, read back from their checkpoints
        assert 0 < float(row["entropy_end_mean"]) < math.log(101) and -100 <= float(row["value_end_mean"]) <= 100
    assert (out / "team_return.png").is_file()
    capsys.readouterr()
    ltcr_compare.main(argv)
    assert capsys.readouterr().out.count("skip (finished)") == 2
