"""Shared fixtures and the test processes' settings; the helpers themselves are in `tests/helpers/`."""

import os

import pytest
import torch

from tests.helpers import tiny_sera_config


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist each worker gets one core; more threads per worker only oversubscribe the machine. Subprocesses
# inherit the same count through OMP_NUM_THREADS, so that outputs they compute are bit-identical to ours.
NUM_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads()))
torch.set_num_threads(NUM_THREADS)
os.environ["OMP_NUM_THREADS"] = str(NUM_THREADS)


@pytest.fixture
def tiny_config():
    return tiny_sera_config()
