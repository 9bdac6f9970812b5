"""A non-editable ``pip install .`` into a fresh virtual environment runs a job from an unrelated directory:
configs, model definitions and DeepSpeed configs ship inside the package and are found by name."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UNTRACKED = ("build", "dist", "runs", "data", "work_dirs", ".git", "*.egg-info", "__pycache__", ".pytest_cache")


def test_installed_package_trains_exports_and_loads_from_an_unrelated_directory(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*UNTRACKED))
    venv = tmp_path / "venv"
    # no pip of its own: the system pip and setuptools (a venv's bundled setuptools may predate bdist_wheel)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch, DeepSpeed and the rest come from the system site-packages; only agvm-ds is built and installed
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, capture_output=True)
    shutil.rmtree(source)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import agvm_ds.resources as r; print(r.shipped_dir('models'))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv) and (Path(where) / "faster_rcnn_r18_tiny.yaml").is_file()

    train = subprocess.run(
        [str(venv / "bin" / "agvm-train"), "--config", "synthetic_tiny", "deepspeed=zero0_fp32",
         "model=faster_rcnn_r18_tiny", "output_dir=run", "data.root=data", "data.synthetic_train=8",
         "data.synthetic_val=4", "data.synthetic_size=96", "data.scales=[96]", "data.max_size=96", "data.test_size=96",
         "data.num_workers=0", "data.batch_size_per_rank=2", "train.max_iters=1"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert (elsewhere / "run" / "eval" / "metrics.json").is_file()

    subprocess.run([str(venv / "bin" / "agvm-export"), "run", "--out", "model.safetensors"],
                   cwd=elsewhere, env=env, check=True, capture_output=True)
    loaded = subprocess.run([str(python), "-c", "import agvm_ds; m = agvm_ds.load_detector('model.safetensors'); "
                             "print(m.transform.min_size, [c['name'] for c in m.categories])"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "(96,) ['circle', 'square', 'triangle', 'star']"
