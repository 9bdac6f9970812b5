"""gymnasium is LTCR's dependency only: the detection trainer installs and runs without it."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires

BLOCK_GYMNASIUM = "import sys; sys.modules['gymnasium'] = None; "


def test_gymnasium_is_required_only_by_the_ltcr_extra():
    gym = [r for r in requires("agvm-ds") or () if r.lower().startswith("gymnasium")]
    assert gym and all('extra == "ltcr"' in r for r in gym), gym


def test_the_detection_trainer_and_its_commands_import_without_gymnasium():
    modules = ["agvm_ds.engine.trainer", *(f"agvm_ds.commands.{c}" for c in
                                          ("train", "evaluate", "predict", "export", "plot", "model_info"))]
    code = BLOCK_GYMNASIUM + "".join(f"import {m}; " for m in modules)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_ltcr_without_gymnasium_names_the_extra_to_install():
    result = subprocess.run([sys.executable, "-c", BLOCK_GYMNASIUM + "import ltcr"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "pip install 'agvm-ds[ltcr]'" in result.stderr.strip().splitlines()[-1]
