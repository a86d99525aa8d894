"""The referring-image-segmentation pipeline: call forms, outputs at the original size, batching, devices, bad input,
and a saved pipeline rebuilt by `pipeline(..., trust_remote_code=True)` in a process without this package."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_sera import ReferringImageSegmentationPipeline
from sera_training.export import save_untrained_model
from tests.helpers import TINY_HUB_CONFIG
from tests.helpers.cross_process import run_in_fresh_process
from tests.helpers.images import scene


TASK = "referring-image-segmentation"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "sera-tiny"
    model, processor = save_untrained_model(folder, TINY_HUB_CONFIG)
    return folder, model, processor


@pytest.fixture(scope="module")
def segmenter(saved_model):
    folder, _, _ = saved_model
    return pipeline(TASK, model=str(folder), trust_remote_code=True, device="cpu")


def direct_prediction(model, processor, image, text, threshold=None):
    """What the model and processor give without the pipeline."""
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
    result = processor.post_process_referring_segmentation(outputs, inputs["original_sizes"], threshold=threshold)[0]
    return result["mask"].numpy(), float(result["score"])


def as_bool(mask: Image.Image) -> np.ndarray:
    return np.asarray(mask) > 0


def test_one_pair_gives_a_mask_at_the_original_size(segmenter, saved_model):
    _, model, processor = saved_model
    image = scene()
    result = segmenter(image, "the red circle")
    assert set(result) == {"mask", "score"}
    assert isinstance(result["mask"], Image.Image) and result["mask"].mode == "L"
    assert result["mask"].size == image.size
    assert set(np.unique(np.asarray(result["mask"]))) <= {0, 255}
    expected_mask, expected_score = direct_prediction(model, processor, image, "the red circle")
    np.testing.assert_array_equal(as_bool(result["mask"]), expected_mask)
    assert isinstance(result["score"], float) and result["score"] == pytest.approx(expected_score, abs=1e-6)


def test_an_image_may_be_a_path_a_pil_image_or_an_array(segmenter, tmp_path):
    image = scene(70, 50, seed=1)
    image.save(tmp_path / "scene.png")
    masks = [
        as_bool(segmenter(source, "the blue square")["mask"])
        for source in (str(tmp_path / "scene.png"), tmp_path / "scene.png", image, np.asarray(image))
    ]
    for mask in masks[1:]:
        np.testing.assert_array_equal(mask, masks[0])


def test_many_pairs_come_back_in_order_and_batching_changes_nothing(segmenter):
    images = [scene(90, 60), scene(40, 120, seed=2), scene(64, 64, seed=3), scene(100, 30, seed=4)]
    texts = ["the red circle", "the blue square", "the square on the right", "the left one"]
    pairs = [{"image": image, "text": text} for image, text in zip(images, texts)]
    one_by_one = segmenter(pairs)
    batched = segmenter(pairs, batch_size=3)
    assert len(one_by_one) == len(batched) == 4
    for single, in_batch, image in zip(one_by_one, batched, images):
        assert single["mask"].size == in_batch["mask"].size == image.size
        # Batched matrix products may round differently: allow a pixel or two at the threshold.
        assert (as_bool(single["mask"]) != as_bool(in_batch["mask"])).mean() < 1e-3
        assert in_batch["score"] == pytest.approx(single["score"], abs=1e-4)


def test_one_image_or_one_expression_pairs_with_every_item_of_the_other(segmenter):
    image, other = scene(), scene(50, 50, seed=5)
    by_text = segmenter(image, ["the red circle", "the blue square"])
    assert [result["mask"].size for result in by_text] == [image.size, image.size]
    by_image = segmenter([image, other], "the red circle")
    assert [result["mask"].size for result in by_image] == [image.size, other.size]
    zipped = segmenter([image, other], ["the red circle", "the blue square"])
    np.testing.assert_array_equal(as_bool(zipped[0]["mask"]), as_bool(by_text[0]["mask"]))
    single = segmenter({"image": other, "text": "the blue square"})
    np.testing.assert_array_equal(as_bool(single["mask"]), as_bool(zipped[1]["mask"]))


def test_threshold_and_router_weights(segmenter, saved_model):
    _, model, processor = saved_model
    image = scene()
    everything = segmenter(image, "the red circle", threshold=0.0)
    assert as_bool(everything["mask"]).all()
    nothing = segmenter(image, "the red circle", threshold=1.0)
    assert not as_bool(nothing["mask"]).any() and nothing["score"] == 0.0
    expected_mask, _ = direct_prediction(model, processor, image, "the red circle", threshold=0.52)
    np.testing.assert_array_equal(as_bool(segmenter(image, "the red circle", threshold=0.52)["mask"]), expected_mask)

    weights = segmenter(image, "the red circle", return_router_weights=True)["router_weights"]
    assert list(weights["fusion"]) == ["spatial", "context", "boundary", "shape"]
    assert list(weights["adapter"]) == ["spatial", "boundary"]
    # Top-4 of 4 experts: each level's weights are a softmax, and so is their mean; the adapter's router is dense.
    assert sum(weights["fusion"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(weights["adapter"].values()) == pytest.approx(1.0, abs=1e-5)


def test_bad_input_raises_errors_that_say_what_to_do(segmenter, saved_model, tmp_path):
    image = scene()
    with pytest.raises(FileNotFoundError, match="Image file not found: .*missing.png .*pair 1"):
        segmenter([{"image": image, "text": "a"}, {"image": str(tmp_path / "missing.png"), "text": "b"}])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="Cannot read .*notes.png as an image"):
        segmenter(str(tmp_path / "notes.png"), "the red circle")
    with pytest.raises(ValueError, match="Give each image its referring expression"):
        segmenter(image)
    with pytest.raises(ValueError, match="Got 2 images and 3 expressions"):
        segmenter([image, image], ["a", "b", "c"])
    with pytest.raises(ValueError, match="Pair 0 needs a non-empty referring expression"):
        segmenter(image, "  ")
    with pytest.raises(ValueError, match="exactly the keys 'image' and 'text'"):
        segmenter([{"img": image, "text": "a"}])
    with pytest.raises(TypeError, match="file path, an http"):
        segmenter(42, "the red circle")
    with pytest.raises(ValueError, match="threshold is a probability"):
        segmenter(image, "the red circle", threshold=2.0)
    _, model, _ = saved_model
    with pytest.raises(ValueError, match="needs the model's processor"):
        ReferringImageSegmentationPipeline(model=model, device="cpu")


def test_saved_pipeline_loads_in_a_fresh_process_without_the_package(segmenter, tmp_path):
    folder = tmp_path / "with-pipeline"
    segmenter.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_sera.ReferringImageSegmentationPipeline"
    for name in ("pipeline_sera.py", "modeling_sera.py", "processing_sera.py", "processor_config.json"):
        assert (folder / name).is_file(), name

    images = [scene(), scene(40, 90, seed=6)]
    texts = ["the red circle", "the blue square"]
    for index, image in enumerate(images):
        image.save(tmp_path / f"image_{index}.png")
    expected = segmenter([{"image": image, "text": text} for image, text in zip(images, texts)])
    np.savez(tmp_path / "expected_masks.npz", *[as_bool(r["mask"]) for r in expected])
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from transformers import pipeline
        segmenter = pipeline({TASK!r}, model={str(folder)!r}, trust_remote_code=True, device="cpu")
        assert type(segmenter).__module__.startswith("transformers_modules."), type(segmenter).__module__
        pairs = [{{"image": {str(tmp_path)!r} + f"/image_{{i}}.png", "text": text}} for i, text in enumerate({texts!r})]
        results = segmenter(pairs)
        assert [r["mask"].size for r in results] == [(90, 60), (40, 90)]
        expected_masks = np.load({str(tmp_path)!r} + "/expected_masks.npz")
        for index, result in enumerate(results):
            np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, expected_masks[f"arr_{{index}}"])
        print("SCORES", [round(r["score"], 4) for r in results])
        assert not any(name.split(".")[0] == "modeling_sera" for name in sys.modules)
        print("PIPELINE-OK")
        """
    )
    result = run_in_fresh_process(script, tmp_path, "PIPELINE-OK")
    scores = json.loads(result.stdout.split("SCORES ")[1].splitlines()[0])
    assert scores == pytest.approx([r["score"] for r in expected], abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_the_gpu_like_on_the_cpu(saved_model, segmenter):
    folder, _, _ = saved_model
    on_gpu = pipeline(TASK, model=str(folder), trust_remote_code=True, device="cuda")
    assert on_gpu.model.device.type == "cuda"
    image = scene()
    gpu_result, cpu_result = on_gpu(image, "the red circle"), segmenter(image, "the red circle")
    assert (as_bool(gpu_result["mask"]) != as_bool(cpu_result["mask"])).mean() < 1e-2
    assert gpu_result["score"] == pytest.approx(cpu_result["score"], abs=1e-3)
