"""Comparing model outputs computed in two processes (this one and a fresh `python -c ...`).

Two processes on one machine, with one thread count, still need not give bit-identical fp32 logits: oneDNN and
the BLAS pick kernels by CPU features and by buffer alignment, and a different blocking sums in a different order.
Each fp32 sum then differs by a few units in the last place (eps = 1.2e-7), and a few tens of layers grow that to
about 1e-6 relative. The bounds below leave a margin of about 100x over that and are still orders of magnitude
below what a real fault changes (a wrong or missing weight, another code path: differences of 1e-2 and more).

Masks are compared exactly. That is sound only where no pixel's probability lies so close to the threshold that
logits within the bounds could put it on the other side: `assert_masks_are_stable` checks that for the reference
logits (upsampling with non-negative weights moves no value by more than the largest logit change, and the
sigmoid moves it by at most a quarter of that).
"""

import os
import subprocess
import sys
import tempfile

import torch


LOGITS_RTOL = 1e-4
LOGITS_ATOL = 1e-5
# The same bounds, as source text for the scripts the tests run in a fresh process.
ASSERT_LOGITS_CLOSE = f"torch.testing.assert_close(logits, reference, rtol={LOGITS_RTOL}, atol={LOGITS_ATOL})"


def largest_logit_change(logits: torch.Tensor) -> float:
    """The most any logit may move within the bounds above."""
    return LOGITS_ATOL + LOGITS_RTOL * float(logits.detach().abs().max())


def assert_masks_are_stable(processor, logits: torch.Tensor, target_sizes, threshold: float | None = None) -> None:
    """The masks `processor` makes from `logits` are the same for any logits within the bounds above."""
    threshold = processor.mask_threshold if threshold is None else threshold
    margin = 0.25 * largest_logit_change(logits)
    masks = [
        [result["mask"] for result in processor.post_process_referring_segmentation(logits, target_sizes, threshold=t)]
        for t in (threshold - margin, threshold, threshold + margin)
    ]
    for low, middle, high in zip(*masks):
        assert torch.equal(low, middle) and torch.equal(middle, high), (
            "a pixel's probability lies within the cross-process tolerance of the threshold: exact mask comparison "
            "would depend on the CPU; choose other inputs or weights"
        )


def run_in_fresh_process(script: str, folder, marker: str):
    """Runs ``python -c script`` in ``folder`` as a user's fresh process would: without this repository on
    PYTHONPATH, offline, with an empty HF_HOME. Asserts that it printed ``marker``; returns the CompletedProcess."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=tempfile.mkdtemp(dir=folder), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert marker in result.stdout, result.stderr[-3000:]
    return result
