import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import CLIPTokenizer
from transformers.testing_utils import CaptureLogger

from modeling_sera import processing_sera
from modeling_sera.image_processing_sera import SeraImageProcessor
from modeling_sera.processing_sera import SeraProcessor
from sera_training.build_tokenizer import build_clip_tokenizer


REPO_ROOT = Path(__file__).resolve().parents[1]


CORPUS = ["the dog on the left", "man in the red shirt", "woman holding an umbrella", "the cup near the laptop"] * 3
MAX_TEXT_LENGTH = 9


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(CORPUS, vocab_size=600)


@pytest.fixture
def processor(tokenizer):
    return SeraProcessor(SeraImageProcessor(size=64), tokenizer, max_text_length=MAX_TEXT_LENGTH)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        PIL.Image.fromarray(rng.integers(0, 256, size=(37, 91, 3), dtype=np.uint8)),
        PIL.Image.fromarray(rng.integers(0, 256, size=(30, 20, 3), dtype=np.uint8)),
    ]


def test_outputs_for_images_and_text(processor, images, tokenizer):
    outputs = processor(images=images, text=["the dog", "man in the red shirt"])
    assert set(outputs) == {
        "pixel_values",
        "original_sizes",
        "letterbox_sizes",
        "letterbox_offsets",
        "input_ids",
        "attention_mask",
    }
    assert outputs["pixel_values"].shape == (2, 3, 64, 64)
    assert outputs["original_sizes"].tolist() == [[37, 91], [30, 20]]
    assert outputs["input_ids"].shape == outputs["attention_mask"].shape == (2, MAX_TEXT_LENGTH)
    assert outputs["input_ids"].dtype == torch.int64

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    words = tokenizer("the dog", add_special_tokens=False)["input_ids"]
    assert outputs["input_ids"][0].tolist() == [bos, *words] + [eos] * (MAX_TEXT_LENGTH - 1 - len(words))
    assert outputs["attention_mask"][0].tolist() == [1] * (len(words) + 2) + [0] * (MAX_TEXT_LENGTH - len(words) - 2)
    # same pixels as the image processor alone
    torch.testing.assert_close(
        outputs["pixel_values"], processor.image_processor(images, return_tensors="pt")["pixel_values"]
    )
    assert processor.model_input_names == ["pixel_values", "input_ids", "attention_mask"]


def test_text_only_image_only_and_masks(processor, images):
    text_only = processor(text="the dog on the left")
    assert set(text_only) == {"input_ids", "attention_mask"} and text_only["input_ids"].shape == (1, MAX_TEXT_LENGTH)
    image_only = processor(images=images[0], return_tensors="np")
    assert isinstance(image_only["pixel_values"], np.ndarray) and "input_ids" not in image_only

    masks = [np.zeros((37, 91), dtype=bool), np.ones((30, 20), dtype=bool)]
    masks[0][5:20, 10:50] = True
    outputs = processor(images=images, text=["the dog", "the cup"], masks=masks)
    expected = processor.image_processor(images, masks=masks, return_tensors="pt")["labels"]
    assert outputs["labels"].shape == (2, 64, 64)
    torch.testing.assert_close(outputs["labels"], expected)


def test_truncation_warns_and_keeps_end_token(processor, tokenizer):
    long_expression = "the man in the red shirt holding an umbrella near the laptop"
    num_tokens = len(tokenizer(long_expression)["input_ids"])
    assert num_tokens > MAX_TEXT_LENGTH
    with CaptureLogger(processing_sera.logger) as captured:
        outputs = processor(text=["the dog", long_expression])
    assert "Expression 1" in captured.out
    assert repr(long_expression) in captured.out
    assert f"{num_tokens} tokens" in captured.out and f"max_text_length={MAX_TEXT_LENGTH}" in captured.out
    assert "Expression 0" not in captured.out
    ids = outputs["input_ids"][1].tolist()
    assert len(ids) == MAX_TEXT_LENGTH and ids[-1] == tokenizer.eos_token_id
    assert outputs["attention_mask"][1].tolist() == [1] * MAX_TEXT_LENGTH

    with CaptureLogger(processing_sera.logger) as captured:
        processor(text="the dog on the left")
    assert captured.out == ""


def test_input_errors(processor, images):
    with pytest.raises(ValueError, match="Expression 1 is empty"):
        processor(text=["the dog", "   "])
    with pytest.raises(ValueError, match="Expression 0 is empty"):
        processor(text="")
    with pytest.raises(TypeError, match="Expression 1 must be a string, got int"):
        processor(text=["the dog", 3])
    with pytest.raises(TypeError, match="got dict"):
        processor(text={"text": "the dog"})
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        processor(images=images, text="the dog")
    with pytest.raises(ValueError, match="1 images but 2 expressions"):
        processor(images=images[0], text=["the dog", "the cup"])
    with pytest.raises(ValueError, match="needs `images`, `text` or both"):
        processor()
    with pytest.raises(TypeError, match="str"):
        processor(images="dog.jpg", text="the dog")


def test_post_processing_uses_the_processor_threshold_which_has_one_home(tokenizer):
    image_processor = SeraImageProcessor(size=64, mask_threshold=0.35)
    processor = SeraProcessor(image_processor, tokenizer)
    logits = torch.zeros(1, 1, 16, 16)  # probability 0.5 everywhere
    (loose,) = processor.post_process_referring_segmentation({"logits": logits}, [(10, 12)])
    assert loose["mask"].all() and loose["score"].item() == pytest.approx(0.5)
    # Given to the processor (as a processor_config.json of 0.1.0 does), the threshold replaces the image processor's.
    processor = SeraProcessor(image_processor, tokenizer, mask_threshold=0.6)
    assert processor.mask_threshold == image_processor.mask_threshold == 0.6
    (strict,) = processor.post_process_referring_segmentation({"logits": logits}, [(10, 12)])
    assert strict["mask"].shape == (10, 12) and not strict["mask"].any() and strict["score"].item() == 0
    assert (
        "mask_threshold" not in processor.to_dict() and processor.to_dict()["image_processor"]["mask_threshold"] == 0.6
    )
    (explicit,) = processor.post_process_referring_segmentation({"logits": logits}, [(10, 12)], threshold=0.4)
    assert explicit["mask"].all()


def test_save_and_load_round_trip(processor, images, tmp_path):
    processor.mask_threshold = 0.45
    processor.save_pretrained(tmp_path)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).is_file()
    reloaded = SeraProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded.tokenizer, CLIPTokenizer)
    assert isinstance(reloaded.image_processor, SeraImageProcessor)
    assert reloaded.max_text_length == MAX_TEXT_LENGTH and reloaded.mask_threshold == 0.45
    assert reloaded.image_processor.to_dict() == processor.image_processor.to_dict()

    text = ["the dog", "man in the red shirt"]
    expected, actual = processor(images=images, text=text), reloaded(images=images, text=text)
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def test_loads_as_remote_code_without_the_package(processor, images, tmp_path, monkeypatch):
    # What every checkpoint relies on: the saved files load with trust_remote_code in a process that cannot import
    # modeling_sera.
    monkeypatch.setattr(SeraProcessor, "_auto_class", "AutoProcessor")
    monkeypatch.setattr(SeraImageProcessor, "_auto_class", "AutoImageProcessor")
    checkpoint = tmp_path / "checkpoint"
    processor.save_pretrained(checkpoint)
    assert (checkpoint / "processing_sera.py").is_file() and (checkpoint / "image_processing_sera.py").is_file()
    expected = processor(images=images[0], text="the dog on the left")

    script = textwrap.dedent(
        f"""
        import sys
        import torch
        from transformers import AutoProcessor
        assert "modeling_sera" not in sys.modules
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "SeraProcessor" and processor.max_text_length == {MAX_TEXT_LENGTH}
        outputs = processor(images=torch.load({str(tmp_path / "image.pt")!r}), text="the dog on the left")
        torch.save(dict(outputs), {str(tmp_path / "outputs.pt")!r})
        """
    )
    torch.save(torch.from_numpy(np.array(images[0])), tmp_path / "image.pt")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, check=True, timeout=120)

    outputs = torch.load(tmp_path / "outputs.pt")
    assert set(outputs) == set(expected)
    for key in expected:
        torch.testing.assert_close(outputs[key], expected[key])
