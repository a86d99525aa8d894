"""Encoder pretraining: per-patch targets, captions, a few training steps, and the folders SERA is built from."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTextModelWithProjection, Dinov2WithRegistersModel

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from sera_training.pretrain_encoders import (
    DEFAULT_CONFIG,
    EncoderPretrainingModel,
    contrastive_loss,
    evaluate,
    load_pretrained_encoders,
    pretrain_encoders,
    pretraining_losses,
)
from sera_training.pretraining_data import (
    CAPTION_VARIANTS,
    caption_variants,
    load_or_build_pretraining_pool,
    patch_targets,
)


COMMITTED_VISION = DEFAULT_CONFIG / "vision_encoder"
COMMITTED_TEXT = DEFAULT_CONFIG / "text_encoder"


def sera_settings() -> dict:
    """The tiny config's SERA fields (everything but the encoders), as keyword arguments."""
    config = json.loads((DEFAULT_CONFIG / "config.json").read_text())
    skipped = {"vision_config", "text_config", "architectures", "auto_map", "model_type", "transformers_version"}
    return {key: value for key, value in config.items() if key not in skipped}


def tiny_pool(cache_dir: Path, num_images: int, seed: int = 0):
    config = SeraConfig.from_pretrained(DEFAULT_CONFIG)
    processor = SeraProcessor.from_pretrained(DEFAULT_CONFIG)
    return load_or_build_pretraining_pool(
        processor.image_processor,
        processor.tokenizer,
        config.vision_config.patch_size,
        num_images,
        seed=seed,
        caption_length=config.text_config.max_position_embeddings,
        cache_dir=cache_dir,
    )


def test_patch_targets_follow_the_letterbox():
    # A 16x32 image (wide): letterboxed into 32x32 it is scaled by 1 and gets 8 rows of padding above and below.
    maps = {name: np.zeros((16, 32), dtype=np.uint8) for name in ("size", "texture", "color", "shape")}
    for name, value in (("size", 1), ("texture", 2), ("color", 3), ("shape", 4)):
        maps[name][:, 16:] = value  # one object fills the right half
    targets = patch_targets(maps, letterbox=(16, 32, 8, 0), image_size=32, patch_size=8)
    assert targets.shape == (4, 4, 4)
    assert (targets[:, [0, 3]] == 0).all()  # padding rows are background
    assert (targets[:, 1:3, :2] == 0).all()  # the left half is background
    np.testing.assert_array_equal(targets[:, 1:3, 2:], np.array([1, 2, 3, 4])[:, None, None] * np.ones((2, 2)))


def test_patch_targets_keep_the_attributes_of_one_object():
    # One patch, three objects: A (red circle) 28 pixels, B (blue square) 18, C (blue star) 18. Voting attribute by
    # attribute would say "blue circle", which is no object there; voting on whole objects says "red circle".
    owner = np.array([0] * 28 + [1] * 18 + [2] * 18).reshape(8, 8)
    colors, shapes = np.array([1, 3, 3]), np.array([1, 2, 4])
    maps = {
        "size": np.ones((8, 8), dtype=np.uint8),
        "texture": np.ones((8, 8), dtype=np.uint8),
        "color": colors[owner].astype(np.uint8),
        "shape": shapes[owner].astype(np.uint8),
    }
    targets = patch_targets(maps, letterbox=(8, 8, 0, 0), image_size=8, patch_size=8)
    np.testing.assert_array_equal(targets[:, 0, 0], [1, 1, 1, 1])


def test_caption_variants_name_places_and_mirror_them():
    maps = {name: np.zeros((30, 30), dtype=np.uint8) for name in ("size", "texture", "color", "shape")}
    # A big solid red circle at the top left and a small striped blue square at the bottom right.
    for name, value in (("size", 3), ("texture", 1), ("color", 1), ("shape", 1)):
        maps[name][2:8, 2:8] = value
    for name, value in (("size", 1), ("texture", 2), ("color", 3), ("shape", 2)):
        maps[name][22:28, 22:28] = value
    caption = "a big red circle and a small striped blue square"
    for seed in range(5):
        variants = caption_variants(caption, maps, np.random.default_rng(seed))
        assert set(variants) == set(CAPTION_VARIANTS)
        assert variants["objects"] == caption
        assert variants["order"] in (
            "from left to right: a big red circle and a small striped blue square",
            "from top to bottom: a big red circle and a small striped blue square",
        )
        for phrase in variants["positions"].split(" and "):
            assert phrase in ("a big red circle at the top left", "a small striped blue square at the bottom right")
        mirrored = variants["positions"].replace("top left", "TL").replace("bottom right", "top left")
        assert variants["positions_mirrored"] == mirrored.replace("TL", "bottom right")


def test_hard_negatives_are_the_mirrored_positions_captions(tmp_path):
    pool = tiny_pool(tmp_path, num_images=12)
    indices = np.arange(12)
    variants = np.full(12, CAPTION_VARIANTS.index("positions"))
    variants[::2] = CAPTION_VARIANTS.index("objects")
    negatives = pool.mirrored_captions(indices, variants)
    chosen = indices[(indices % 2 == 1) & pool.has_mirror]
    mirrored = CAPTION_VARIANTS.index("positions_mirrored")
    np.testing.assert_array_equal(negatives["negative_input_ids"].numpy(), pool.caption_ids[chosen, mirrored])

    # A negative that looks exactly like the right caption makes the loss worse; one far from every image does not.
    image_embeds = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(2.0)
    plain = contrastive_loss(image_embeds, image_embeds, scale)
    assert contrastive_loss(image_embeds, image_embeds, scale, image_embeds[:1]) > plain
    torch.testing.assert_close(contrastive_loss(image_embeds, image_embeds, scale, image_embeds[:0]), plain)


def test_pretraining_writes_encoders_that_sera_accepts(tmp_path):
    output = tmp_path / "encoders"
    report = pretrain_encoders(
        output=output,
        num_images=8,
        num_eval_images=4,
        max_steps=2,
        batch_size=4,
        retrieval_candidates=2,
        eval_every=0,
        hard_negatives=True,
        cache_dir=tmp_path / "cache",
        log=lambda message: None,
    )
    assert report["steps"] == 2 and report["stopped_by"] == "max_steps"
    evaluation = report["held_out_evaluation"]
    assert evaluation["retrieval_chance"] == 0.5
    assert set(evaluation["patch_attribute_accuracy"]) == {"size", "texture", "color", "shape"}
    assert json.loads((output / "pretraining_report.json").read_text())["steps"] == 2

    vision = Dinov2WithRegistersModel.from_pretrained(output / "vision_encoder")
    text = CLIPTextModelWithProjection.from_pretrained(output / "text_encoder")
    tiny = SeraConfig.from_pretrained(DEFAULT_CONFIG)
    tiny_processor = SeraProcessor.from_pretrained(DEFAULT_CONFIG)  # the sizes live in the processor
    assert vision.config.hidden_size == tiny.vision_config.hidden_size
    assert text.config.projection_dim == tiny.text_config.projection_dim

    model, processor = SeraForReferringSegmentation.from_encoders(
        str(output / "vision_encoder"),
        str(output / "text_encoder"),
        return_processor=True,
        image_size=tiny_processor.image_size,
        max_text_length=tiny_processor.max_text_length,
        **sera_settings(),
    )
    torch.testing.assert_close(
        model.model.vision_model.embeddings.patch_embeddings.projection.weight,
        vision.embeddings.patch_embeddings.projection.weight,
    )
    torch.testing.assert_close(model.model.text_model.text_projection.weight, text.text_projection.weight)
    assert processor.max_text_length == tiny_processor.max_text_length
    assert processor.image_size == tiny_processor.image_size
    inputs = processor(images=[np.zeros((40, 60, 3), dtype=np.uint8)], text=["the red circle"])
    with torch.no_grad():
        assert model(**inputs).logits.shape[0] == 1


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    pool = tiny_pool(tmp_path, num_images=4)
    batch = pool.batch(np.arange(4), variants=np.arange(4) % 3)
    model = EncoderPretrainingModel(SeraConfig.from_pretrained(DEFAULT_CONFIG))
    # Small steps: Adam's first steps from scratch at the training lr (1e-3, with warmup there) can overshoot.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    initial = pretraining_losses(model, batch)
    for _ in range(3):
        loss = pretraining_losses(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = pretraining_losses(model, batch)
    assert final["loss"] < initial["loss"]
    assert final["contrastive"] < initial["contrastive"]
    assert final["attributes"] < initial["attributes"]


@pytest.mark.skipif(
    not (COMMITTED_VISION / "model.safetensors").exists(), reason="the pretrained encoders are not committed"
)
def test_committed_encoders_load_and_retrieve_above_chance(tmp_path):
    Dinov2WithRegistersModel.from_pretrained(COMMITTED_VISION)
    CLIPTextModelWithProjection.from_pretrained(COMMITTED_TEXT)
    model = load_pretrained_encoders(DEFAULT_CONFIG)
    # Scenes of a seed pretraining never used: fresh, but from the same (non-referring) stream.
    pool = tiny_pool(tmp_path, num_images=40, seed=1000)
    evaluation = evaluate(model, pool, np.arange(40), candidates=20)
    chance = evaluation["retrieval_chance"]
    assert evaluation["objects_captions"]["image_to_caption_top1"] > 3 * chance
    assert evaluation["objects_captions"]["caption_to_image_top1"] > 3 * chance
    assert evaluation["patch_attribute_accuracy"]["color"]["object_patches"] > 0.5
