"""`accelerate launch training/train.py` on tiny synthetic data, on CPU, as the training tests run it."""

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT


TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
DEBUG_LOG_SCRIPT = REPO_ROOT / "tests" / "helpers" / "train_with_debug_log.py"
TINY_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"
TINY_DATA = "train=3,validation=2,test=2,test_unseen=2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    options: str, output_dir: Path, cache_dir: Path, num_processes: int = 1, timeout: int = 300, script=TRAIN_SCRIPT
):
    """`accelerate launch training/train.py OPTIONS` on the tiny data, on CPU; returns the CompletedProcess."""
    # One thread per process: the runs are tiny, and a multi-threaded run slows down badly when the cores are shared
    # (pytest -n 2, other jobs). The runs compared bit for bit all use the same setting.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    if num_processes > 1:
        launcher = ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        launcher = ["--num_processes", "1"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        "--config_name",
        str(TINY_CONFIG),
        "--output_dir",
        str(output_dir),
        "--synthetic_cache_dir",
        str(cache_dir),
        "--synthetic_num_images",
        TINY_DATA,
        "--no_progress_bar",
        *shlex.split(options),
    ]
    result = subprocess.run(
        command, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result


def check_ok(result) -> None:
    assert result.returncode == 0, (
        f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
