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
# The demo's browser test (tests/test_demo_browser.py) needs gradio, the "demo" extra. gradio 6.31 declares pillow<13
# and this package pins pillow==13.0.0, so pip cannot resolve both at once: install gradio alone, then put the pinned
# pillow back (pip then reports the declared conflict; the demo and its test run on pillow 13.0.0).
python -m pip install --quiet "gradio==6.31.0"
python -m pip install --quiet "pillow==13.0.0"
python -m pytest -n 2 --dist loadfile "$@"
