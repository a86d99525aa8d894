#!/usr/bin/env bash
# Install SERA with its test dependencies into ./.venv (from scratch if needed) and run the test-suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first: the pinned CPU build; a bare "torch" requirement would pull a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev]"
python -m pytest -n 2 --dist loadfile "$@"
