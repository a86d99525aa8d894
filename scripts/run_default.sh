#!/usr/bin/env bash
# Install SERA into ./.venv and run the main job: build the built-in synthetic referring dataset, train the tiny
# SERA on it in the paper's regime, evaluate on its test splits, and write the model folder to outputs/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -c constraints.txt torch  # the pinned CPU build first (see scripts/run_tests.sh)
python -m pip install --quiet -c constraints.txt -e .
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no training/train.py "$@"
