"""LTCR configs: shipped files load, and bad input gets one clear error naming the key and what is valid."""
import subprocess
import sys

import pytest
import yaml

from ltcr.config import CONFIG_DIR, load_config


@pytest.mark.parametrize("name", ["cartpole", "acrobot", "mountaincar", "lunarlander"])
def test_shipped_configs_load_with_a_heterogeneous_team(name):
    config = load_config(name)
    agents = [config.agent_for(rank) for rank in range(4)]
    assert len({(a.eps_decay_steps, a.eps_final, a.hidden) for a in agents}) == 4


def test_overrides_reach_nested_keys_and_per_agent_entries():
    config = load_config("cartpole", ["transfer.distill=false", "agent.lr=0.01", "per_agent=[{hidden: [8]}, {}]"])
    assert config.transfer.distill is False and config.agent.lr == 0.01
    assert config.agent_for(2).hidden == (8,) and config.agent_for(3).hidden == config.agent.hidden


@pytest.mark.parametrize("override,message", [
    ("transfer.budget=5",
     r"transfer: unknown key\(s\) \['transfer.budget'\]; valid keys are \['batch', 'budget_bytes', "),
    ("env=Pong-v5", r"env='Pong-v5': unknown environment; expected one of \['Acrobot-v1', 'CartPole-v1', "
                    r"'LunarLander-v3', 'MountainCar-v0'\]"),
    ("agent.gamma=1.5", r"agent.gamma=1.5: expected a finite number in \[0, 1\]"),
    ("agent.atoms=one", r"agent.atoms='one': expected int"),
    ("transfer.teacher=oldest", r"transfer.teacher='oldest': expected one of \['confidence', 'return'\]"),
    ("transfer.batch=500", r"transfer.batch=500: expected at most transfer.interval=100"),
    ("agent.v_min=200", r"agent.v_min=200.0, agent.v_max=100.0 \(unset ones are CartPole-v1's \[0, 100\]\): "
                        r"expected v_min < v_max"),
    ("per_agent=[{atoms: 11}]", r"per_agent\[0\].atoms: the support must be the same for every agent"),
    ("per_agent=[{}, {lr: -1}]", r"per_agent\[1\]: agent.lr=-1.0: expected a finite number > 0"),
    ("per_agent=[{widht: 3}]", r"per_agent\[0\]: unknown key\(s\) \['per_agent\[0\].widht'\]; valid keys are \["),
    ("agent.hidden=[64, {a: 1}]", r"agent.hidden=\{'a': 1\}: expected int"),
])
def test_bad_values_name_the_key_and_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIG_DIR / "cartpole.yaml", [override])


def test_v_min_above_environment_v_max_is_refused_when_both_set():
    with pytest.raises(ValueError, match=r"agent.v_min=5.0, agent.v_max=1.0: expected v_min < v_max"):
        load_config(None, ["agent.v_min=5", "agent.v_max=1"])


def test_cli_reports_an_unknown_environment_in_one_line():
    result = subprocess.run([sys.executable, "-m", "ltcr.cli", "--config", "cartpole", "env=Pong-v5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ltcr-train: {CONFIG_DIR / 'cartpole.yaml'}: env='Pong-v5': unknown environment; expected one of "
        "['Acrobot-v1', 'CartPole-v1', 'LunarLander-v3', 'MountainCar-v0']"]


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"LTCR config not found: cartpol \(shipped configs: \['acrobot', "):
        load_config("cartpol")


def test_resolved_config_written_by_a_run_loads_back_equal(tmp_path):
    config = load_config("lunarlander", ["transfer.teacher=return", "per_agent=[{hidden: [8, 8]}]"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(tmp_path / "config.yaml") == config


def test_scientific_notation_is_a_float_in_overrides_and_files(tmp_path):
    assert load_config("cartpole", ["agent.lr=1e-3"]).agent.lr == 0.001
    path = tmp_path / "run.yaml"
    path.write_text("agent:\n  lr: 1e-3\n  grad_clip: 5E1\n")
    agent = load_config(path).agent
    assert agent.lr == 0.001 and agent.grad_clip == 50.0


@pytest.mark.parametrize("agvm_ds_override, ltcr_override, wording", [
    ("data.batch_size_per_rank=0", "agent.batch_size=0", "{key}=0: expected an integer >= 1"),
    ("data.batch_size_per_rank=true", "agent.batch_size=true", "{key}=True: expected int (an integer >= 1)"),
    ("optimizer.lr=0", "agent.lr=0", "{key}=0.0: expected a finite number > 0"),
    ("optimizer.lr=.inf", "agent.lr=.inf", "{key}=inf: expected a finite number > 0"),
    ("optimizer.momentum=x", "agent.gamma=x", "{key}='x': expected float (a finite number in ["),
    ("data.aspect_ratio_grouping=1", "transfer.distill=1", "{key}=1: expected true or false"),
    ("data.batchsize=2", "agent.batchsize=2", "{section}: unknown key(s) ['{section}.batchsize']; valid keys are ["),
])
def test_a_mistake_reads_the_same_in_an_agvm_ds_and_an_ltcr_section(agvm_ds_override, ltcr_override, wording):
    from agvm_ds.engine import load_config as load_experiment

    for load, override in ((load_experiment, agvm_ds_override), (load_config, ltcr_override)):
        key = override.partition("=")[0]
        with pytest.raises(ValueError) as error:
            load(None, [override])
        assert str(error.value).startswith(wording.format(key=key, section=key.partition(".")[0])), str(error.value)
        assert "\n" not in str(error.value)


def test_sections_stay_frozen_hashable_dataclasses_with_tuples():
    import dataclasses

    from ltcr.config import AgentConfig

    agent = load_config("cartpole", ["agent.hidden=[32, 16]"]).agent
    assert agent.hidden == (32, 16) and hash(agent) == hash(dataclasses.replace(agent))
    assert dataclasses.asdict(agent)["hidden"] == (32, 16) and dataclasses.replace(agent, lr=0.5).lr == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        agent.lr = 0.5
    with pytest.raises(ValueError, match=r"^atoms=True: expected int \(an integer >= 2\)$"):
        AgentConfig(atoms=True)
