"""One loaded model serving several threads at once, as a pipeline in a web server does: each caller must get its
own answer, the one it gets when it is the only caller."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_sera import SeraForReferringSegmentation, SeraProcessor
from sera_training.export import save_untrained_model
from tests.helpers import TINY_HUB_CONFIG, images


EXPRESSIONS = ["the red circle", "the blue square on the right", "left", "the big shape not red"]
THREADS = 4
ROUNDS = 3


def scene(width: int, height: int, seed: int) -> Image.Image:
    return images.scene(width, height, seed, lowest=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "sera"
    save_untrained_model(folder, TINY_HUB_CONFIG)
    return folder


def requests():
    """Different images (sizes too), expressions (lengths too) and thresholds, one per caller."""
    sizes = [(90, 60), (40, 90), (64, 64), (120, 33)]
    return [(scene(*sizes[index], seed=index), EXPRESSIONS[index], 0.3 + 0.1 * index) for index in range(THREADS)]


def run_concurrently(work, arguments):
    """Call `work(*arguments[i])` from THREADS threads at once, ROUNDS times each; return every answer by caller."""
    start = threading.Barrier(THREADS)
    answers = {index: [] for index in range(THREADS)}
    errors = []

    def caller(index):
        try:
            start.wait()
            for _ in range(ROUNDS):
                answers[index].append(work(*arguments[index]))
        except Exception as error:  # reported below, with the caller it happened to
            errors.append((index, repr(error)))

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert all(len(answers[index]) == ROUNDS for index in range(THREADS)), "a caller did not finish"
    return answers


def test_one_pipeline_serving_several_threads_gives_each_caller_its_own_answer(served):
    segmenter = pipeline("referring-image-segmentation", model=str(served), trust_remote_code=True, device="cpu")

    def segment(image, text, threshold):
        result = segmenter(image, text, threshold=threshold, return_router_weights=True)
        return np.asarray(result["mask"]) > 0, result["score"], result["router_weights"]

    arguments = requests()
    alone = [segment(*request) for request in arguments]
    assert len({mask.shape for mask, _, _ in alone}) == THREADS  # the answers differ, so a mix-up would show
    answers = run_concurrently(segment, arguments)
    for index, expected in enumerate(alone):
        for mask, score, router_weights in answers[index]:
            np.testing.assert_array_equal(mask, expected[0])
            assert score == pytest.approx(expected[1], abs=1e-6)
            for kind, weights in router_weights.items():
                assert weights == pytest.approx(expected[2][kind], abs=1e-6), kind


def test_one_model_serving_several_threads_gives_each_caller_its_own_outputs(served):
    model = SeraForReferringSegmentation.from_pretrained(served).eval()
    processor = SeraProcessor.from_pretrained(served)

    def forward(image, text, _threshold):
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            outputs = model(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
            )
        return outputs.logits, torch.stack(outputs.adapter_router_weights)

    arguments = requests()
    alone = [forward(*request) for request in arguments]
    answers = run_concurrently(forward, arguments)
    for index, (logits, adapter_weights) in enumerate(alone):
        for got_logits, got_weights in answers[index]:
            torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_weights, adapter_weights, rtol=1e-5, atol=1e-6)
