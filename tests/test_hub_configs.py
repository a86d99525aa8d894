"""The published checkpoints' folders: each config loads, each recipe is one train.py accepts, and the real-size ones
follow the paper (Adam, lr 1e-4, x0.1 at epochs 35 and 55 of 65, batch 16, 448 input, no flips; RefCOCOg with 22
tokens). The tiny default run keeps the paper's optimizer and batch but not its lr (see its recipe's comment)."""

import json

import pytest

from modeling_sera import SeraConfig, SeraProcessor
from tests.helpers import REPO_ROOT


HUB_CONFIGS = REPO_ROOT / "hub_configs"
PAPER_CHECKPOINTS = {
    # name: (REFER dataset:split_by, max_text_length, reported splits)
    "sera-refcoco": ("refcoco:unc", 17, ["val", "testA", "testB"]),
    "sera-refcocoplus": ("refcoco+:unc", 17, ["val", "testA", "testB"]),
    "sera-refcocog-umd": ("refcocog:umd", 22, ["val", "test"]),
    "sera-refcocog-google": ("refcocog:google", 22, ["val"]),
}


@pytest.mark.parametrize("name", [*PAPER_CHECKPOINTS, "sera-synthref-tiny"])
def test_every_published_folder_has_a_config_and_a_recipe_train_py_accepts(name):
    from sera_training.arguments import parse_args

    config = SeraConfig.from_pretrained(HUB_CONFIGS / name)
    args = parse_args(["--config_name", str(HUB_CONFIGS / name)])
    assert args.optimizer == "adam" and args.lr_gamma == 0.1
    assert args.learning_rate == (1e-3 if name == "sera-synthref-tiny" else 1e-4)
    assert args.per_device_train_batch_size == 16 and args.horizontal_flip_probability == 0.0
    assert config.use_sera_adapter and config.use_sera_fusion and config.fusion_top_k == 4


@pytest.mark.parametrize("name", PAPER_CHECKPOINTS)
def test_paper_checkpoints_follow_the_paper(name):
    source, max_text_length, reported_splits = PAPER_CHECKPOINTS[name]
    config = json.loads((HUB_CONFIGS / name / "config.json").read_text())
    recipe = json.loads((HUB_CONFIGS / name / "training_recipe.json").read_text())
    reference = json.loads((HUB_CONFIGS / "sera-refcoco" / "config.json").read_text())
    # The same real-size model; only the expression length differs, which is a processor setting, so the recipe
    # gives it (with the letterbox side) to the processor that training builds from the encoders.
    assert config == reference
    assert not {"image_size", "max_text_length", "mask_threshold"} & set(config)
    assert recipe["max_text_length"] == max_text_length and recipe["image_size"] == 448
    assert recipe["dataset"].startswith("refer:") and recipe["dataset"].endswith(":" + source)
    assert recipe["train_split"] == "train" and recipe["test_splits"] == reported_splits
    assert recipe["vision_model_name_or_path"] == "facebook/dinov2-with-registers-base"
    assert recipe["text_model_name_or_path"] == "openai/clip-vit-base-patch16"
    if name == "sera-refcocog-google":
        # 50 epochs (DETRIS); the milestones keep the 65-epoch run's proportions, 35/65 and 55/65.
        assert recipe["num_train_epochs"] == 50
        assert recipe["lr_milestones"] == [round(35 / 65 * 50), round(55 / 65 * 50)] == [27, 42]
        assert recipe["final_weights"] == "last"  # val is the reported split: do not choose on it
    else:
        assert recipe["num_train_epochs"] == 65 and recipe["lr_milestones"] == [35, 55]


def test_the_tiny_folder_keeps_the_sizes_in_its_processor_only():
    folder = HUB_CONFIGS / "sera-synthref-tiny"
    processor = SeraProcessor.from_pretrained(folder)
    assert (processor.image_size, processor.max_text_length, processor.mask_threshold) == (128, 16, 0.35)
    assert not {"image_size", "max_text_length", "mask_threshold"} & set(
        json.loads((folder / "config.json").read_text())
    )
    processor.check_fits(SeraConfig.from_pretrained(folder))
