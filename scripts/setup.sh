#!/usr/bin/env bash
# Set up .venv with everything instill needs: the CPU build of torch from this machine's disk
# first (so no multi-GB CUDA build is pulled), then instill itself with its dev extras and
# Ray (the cluster executor, which the tests run on a local Ray instance).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,cluster]"
