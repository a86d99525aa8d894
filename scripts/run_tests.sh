#!/usr/bin/env bash
# Install SERA with its test dependencies into ./.venv (from scratch if needed) and run the test-suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# pyproject.toml declares ranges; constraints.txt pins the exact versions the suite is checked against.
# torch first: the pinned CPU build; a bare "torch" requirement would pull a multi-GB CUDA build.
python -m pip install --quiet -c constraints.txt torch
python -m pip install --quiet -c constraints.txt -e ".[dev]"
# The demo's browser test (tests/test_demo_browser.py) needs gradio, the "demo" extra. gradio 6.31 declares pillow<13
# while constraints.txt pins pillow==13.0.0, so pip cannot resolve both at once: install the extra against every other
# pin, then put the pinned pillow back (pip then reports the declared conflict; the demo and its test run on 13.0.0).
demo_constraints="$(mktemp)"
trap 'rm -f "$demo_constraints"' EXIT
grep -v '^pillow==' constraints.txt > "$demo_constraints"
python -m pip install --quiet -c "$demo_constraints" -e ".[demo]"
python -m pip install --quiet -c constraints.txt pillow
ruff check .
ruff format --check .
python -m pytest -n 2 --dist loadfile "$@"
