#!/usr/bin/env bash
# Wheels that bench/gpu.sh installs on a GPU machine that has torch and torchvision but cannot reach
# a package index: swavctl's pure-Python dependencies and pytest (for the suite's CUDA-only tests),
# and the demo digits, written ready (they need scikit-learn to make).
# Run it here (where the index is reachable), then carry .whl/ to the GPU machine.
#
#   bash bench/fetch_wheels.sh            # for the GPU machine's Python (default 3.12)
#   PY_VERSIONS="3.11 3.12" bash bench/fetch_wheels.sh
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PACKAGES="pydantic pydantic-core annotated-types typing-extensions typing-inspection rich markdown-it-py
mdurl pygments typer click shellingham annotated-doc tomli tomli-w safetensors pytest pluggy iniconfig packaging"
for version in ${PY_VERSIONS:-3.12}; do
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --dest .whl --no-deps --only-binary=:all: \
    --python-version "$version" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 $PACKAGES
done
# The demo digits come from scikit-learn, whose wheels (with scipy) are too large to carry: write the
# demo folder here instead; gpu.sh points SWAVCTL_CACHE at it when the GPU machine lacks sklearn.
SWAVCTL_CACHE=.whl/swavctl-cache "$PY" -c 'from swavctl.data.demo import demo_dataset; print(demo_dataset())'
ls .whl
