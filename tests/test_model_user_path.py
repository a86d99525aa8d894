"""The whole user path of the model issue: processor + model from hub_configs, save, fresh-process Auto* loading,
and assembling SERA from pretrained encoders saved to local folders."""

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from tests.helpers import TINY_HUB_CONFIG
from tests.helpers.cross_process import ASSERT_LOGITS_CLOSE, assert_masks_are_stable, run_in_fresh_process


def example_images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (37, 91, 3), dtype=np.uint8)),  # wide RGB
        Image.fromarray(rng.integers(0, 255, (300, 20), dtype=np.uint8)),  # tall grayscale (L)
        Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 65535, (50, 70), dtype=np.uint16)),  # 16-bit grayscale
    ]


EXPRESSIONS = ["the red circle", "the dog on the left", "the biggest blue shape", "the second square from the left"]


@pytest.fixture(scope="module")
def tiny_model_and_processor():
    # Seed 17: masks that are neither empty nor full, and no pixel within the cross-process tolerance of the threshold.
    torch.manual_seed(17)
    processor = SeraProcessor.from_pretrained(TINY_HUB_CONFIG)
    model = SeraForReferringSegmentation(SeraConfig.from_pretrained(TINY_HUB_CONFIG)).eval()
    return model, processor


def test_issue_quickstart_runs_on_images_of_any_mode_and_size(tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    images = example_images()
    masks = [np.zeros((image.height, image.width), dtype=bool) for image in images]
    for mask in masks:
        mask[: mask.shape[0] // 2, : mask.shape[1] // 3] = True
    inputs = processor(images=images, text=EXPRESSIONS, masks=masks, return_tensors="pt")
    size = processor.image_size  # the sizes' one home is the processor
    assert inputs["pixel_values"].shape == (4, 3, size, size)
    assert inputs["labels"].shape == (4, size, size)
    assert inputs["original_sizes"].tolist() == [[37, 91], [300, 20], [64, 64], [50, 70]]
    with torch.no_grad():
        outputs = model(**inputs)
    logits_side = size // model.config.vision_patch_size * model.config.projector_upsample_factor
    assert outputs.logits.shape == (4, 1, logits_side, logits_side)
    assert outputs.loss is not None and torch.isfinite(outputs.loss)
    results = processor.post_process_referring_segmentation(outputs, target_sizes=inputs["original_sizes"])
    for result, image in zip(results, images):
        assert result["mask"].dtype == torch.bool
        assert result["mask"].shape == (image.height, image.width)
        assert 0.0 <= float(result["score"]) <= 1.0


def test_model_and_processor_load_through_auto_classes_in_a_fresh_process(tiny_model_and_processor, tmp_path):
    model, processor = tiny_model_and_processor
    model_dir = tmp_path / "sera-synthref-tiny"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    images = example_images()
    inputs = processor(images=images, text=EXPRESSIONS, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    masks = [r["mask"] for r in processor.post_process_referring_segmentation(logits, inputs["original_sizes"])]
    assert_masks_are_stable(processor, logits, inputs["original_sizes"])  # so the masks can be compared exactly
    for index, image in enumerate(images):
        image.save(tmp_path / f"image_{index}.png")
    torch.save({"logits": logits, "masks": masks}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageSegmentation, AutoProcessor
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        reference = expected["logits"]
        images = [Image.open({str(tmp_path)!r} + f"/image_{{i}}.png") for i in range(4)]
        processor = AutoProcessor.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "SeraProcessor", type(processor)
        inputs = processor(images=images, text={EXPRESSIONS!r}, return_tensors="pt")
        for auto_class in (AutoModel, AutoModelForImageSegmentation):
            model = auto_class.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
            with torch.no_grad():
                outputs = model(**inputs)
            logits = outputs.logits
            {ASSERT_LOGITS_CLOSE}  # fp32 bounds: see tests/helpers/cross_process.py
            results = processor.post_process_referring_segmentation(outputs, target_sizes=inputs["original_sizes"])
            for result, mask in zip(results, expected["masks"]):
                assert torch.equal(result["mask"], mask)
        assert not any(name.startswith("modeling_sera") for name in sys.modules)
        print("AUTO-LOAD-OK")
        """
    )
    run_in_fresh_process(script, tmp_path, "AUTO-LOAD-OK")


@pytest.fixture(scope="module")
def pretrained_encoder_folders(tmp_path_factory):
    """A tiny DINOv2-with-registers and a tiny full CLIP model, saved like Hub checkpoints (weights, configs,
    tokenizer, preprocessor config)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(1)
    vision = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=8,
            image_size=64,
            num_register_tokens=4,
        )
    )
    vision.save_pretrained(root / "vision")
    (root / "vision" / "preprocessor_config.json").write_text(
        json.dumps(
            {"image_processor_type": "BitImageProcessor", "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY_HUB_CONFIG)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=20,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=16,
            ),
            projection_dim=24,
        )
    )
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root, vision, clip


def test_from_encoders_loads_pretrained_weights_and_builds_the_matching_processor(pretrained_encoder_folders):
    root, vision, clip = pretrained_encoder_folders
    model, processor = SeraForReferringSegmentation.from_encoders(
        str(root / "vision"),
        str(root / "clip"),
        return_processor=True,
        adapter_layers=[1, 3],
        adapter_dim=16,
        adapter_num_heads=2,
        vision_feature_layers=[2, 3, 4],
        fusion_context_num_heads=2,
        fusion_router_hidden_size=8,
        hidden_size=32,
        decoder_num_heads=2,
        decoder_intermediate_size=64,
        projector_dim=16,
        image_size=64,
        max_text_length=12,
    )
    # Every pretrained tensor arrived, also inside the adapted blocks whose MLP is now wrapped.
    vision_state = model.model.vision_model.state_dict()
    for name, tensor in vision.state_dict().items():
        wrapped = (
            name.replace(".mlp.", ".mlp.base_layer.")
            if name.startswith(("encoder.layer.1.", "encoder.layer.3."))
            else name
        )
        assert torch.equal(vision_state[wrapped], tensor), name
    text_state = model.model.text_model.state_dict()
    clip_state = clip.state_dict()
    for name, tensor in text_state.items():
        assert torch.equal(tensor, clip_state[name]), name
    assert model.config.text_config.projection_dim == 24
    # The processor uses the vision checkpoint's normalisation and the text checkpoint's tokenizer.
    assert list(processor.image_processor.image_mean) == [0.5, 0.4, 0.3]
    assert processor.image_processor.size["height"] == 64 and processor.max_text_length == 12
    assert not hasattr(model.config, "image_size") and not hasattr(model.config, "max_text_length")
    inputs = processor(images=example_images()[:2], text=EXPRESSIONS[:2], return_tensors="pt")
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    assert outputs.logits.shape == (2, 1, 32, 32)


def test_from_encoders_rejects_a_mismatched_checkpoint(pretrained_encoder_folders, tmp_path):
    root, _, _ = pretrained_encoder_folders
    with pytest.raises(ValueError, match="adapter_layers \\[7\\] do not exist"):
        SeraForReferringSegmentation.from_encoders(str(root / "vision"), str(root / "clip"), adapter_layers=[7])
    # Processor sizes the encoders cannot take: the patch is 8 pixels, the text tower has 20 positions.
    fits = dict(adapter_layers=[1, 3], vision_feature_layers=[2, 3, 4])  # a config these encoders can take
    with pytest.raises(ValueError, match="image_size=60 must be a multiple of the vision patch size 8"):
        SeraForReferringSegmentation.from_encoders(str(root / "vision"), str(root / "clip"), image_size=60, **fits)
    with pytest.raises(ValueError, match="max_text_length=30 exceeds the text tower's max_position_embeddings=20"):
        SeraForReferringSegmentation.from_encoders(
            str(root / "vision"), str(root / "clip"), max_text_length=30, **fits
        )
