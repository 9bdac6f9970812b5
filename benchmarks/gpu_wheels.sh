#!/usr/bin/env bash
# Builds .whl/ in the project checkout: the wheels that a GPU machine with Python 3.12, torch,
# torchvision and timm preinstalled, but no package index, still needs to run agvm-ds and its tests
# (deepspeed, built here from its sdist as a pure-Python wheel whose ops JIT-compile on the GPU
# machine; pycocotools; hjson and pydantic with their small dependencies; pytest). .whl/ is git-ignored.
#
# Usage, from the project root:  benchmarks/gpu_wheels.sh
# On the GPU machine, from the project root, before anything else:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda
# then run the project as modules: python3 -m agvm_ds.commands.train --config ... (one GPU, one process),
# or python3 -m deepspeed.launcher.runner --num_gpus N --module agvm_ds.commands.train ...
# (that machine's torch may be older than setup.py's floor: that is why PYTHONPATH, not pip install).
set -euo pipefail
[ -f setup.py ] || { echo "run from the project root" >&2; exit 1; }
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl pycocotools==2.0.11 hjson pydantic pydantic-core annotated-types typing-inspection \
    pytest pluggy iniconfig pygments pytest-timeout
if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz
    rm -rf "$tmp"
fi
du -sh .whl
