"""Tests of the synthetic referring dataset (synthref): scenes, expressions, resolver, splits, cache, CLI."""

import re

import datasets
import numpy as np
import pytest
from PIL import Image

from sera_training import synthetic_data
from sera_training.data_schema import EXAMPLE_FEATURES
from sera_training.synthetic_data import (
    IMAGE_ID_STRIDE,
    SPLITS,
    VOCABULARY,
    build_synthetic_dataset,
    expression_corpus,
    generate_pretraining_examples,
    generate_referring_scene,
)
from sera_training.synthetic_expressions import (
    CATEGORIES,
    TEMPLATES,
    Description,
    StructuredExpression,
    is_unambiguous,
    parse_expression,
    resolve,
    verbalize,
)
from sera_training.synthetic_scenes import (
    ATTRIBUTE_VALUES,
    COLORS,
    HELD_OUT_COMBINATIONS,
    MIN_VISIBLE_FRACTION,
    Scene,
    SceneObject,
    generate_scene,
)


SMALL_SIZES = {"train": 12, "validation": 4, "test": 4, "test_unseen": 8}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synthref_cache")


@pytest.fixture(scope="module")
def small_dataset(cache_root):
    return build_synthetic_dataset(cache_dir=cache_root, seed=0, num_images=SMALL_SIZES)


def _scene_of_row(split, row):
    index = row["image_id"] % IMAGE_ID_STRIDE
    return generate_referring_scene(split, index, seed=0)[0]


# ---------------------------------------------------------------------------------------------------------------
# The built dataset


def test_rows_follow_the_shared_schema(small_dataset):
    assert set(small_dataset) == set(SPLITS)
    for split in SPLITS:
        rows = small_dataset[split]
        assert rows.features == EXAMPLE_FEATURES
        assert set(rows["source"]) == {"synthref"}
        assert len(set(rows["image_id"])) == SMALL_SIZES[split]
        assert len(set(rows["sentence_id"])) == rows.num_rows
        for row in rows.select(range(min(10, rows.num_rows))):
            assert row["mask"].mode == "L"
            assert row["mask"].size == row["image"].size
            assert set(np.unique(np.asarray(row["mask"]))) <= {0, 255}


def test_every_category_is_present(small_dataset):
    assert set(small_dataset["train"]["category"]) == set(CATEGORIES)
    assert set(small_dataset["test_unseen"]["category"]) <= set(CATEGORIES)


def test_refs_have_several_distinct_expressions(small_dataset):
    rows = small_dataset["train"]
    by_ref = {}
    for ref_id, object_id, expression in zip(rows["ref_id"], rows["object_id"], rows["expression"]):
        by_ref.setdefault(ref_id, []).append((object_id, expression))
    assert np.mean([len(sentences) for sentences in by_ref.values()]) >= 2
    for sentences in by_ref.values():
        assert len({object_id for object_id, _ in sentences}) == 1
        assert len({expression for _, expression in sentences}) == len(sentences)


def test_image_sizes_vary_and_are_not_square(small_dataset):
    sizes = {row["image"].size for row in small_dataset["train"]}
    assert len(sizes) > 1
    for width, height in sizes:
        assert width != height
        assert 96 <= width <= 160 and 96 <= height <= 160


def test_each_row_refers_to_exactly_one_object_and_its_visible_mask(small_dataset):
    for split in ("train", "test_unseen"):
        for row in small_dataset[split]:
            scene = _scene_of_row(split, row)
            target = row["object_id"] % 10
            expression = parse_expression(row["expression"])
            assert expression.category == row["category"]
            assert resolve(scene, expression) == {target}
            mask = np.asarray(row["mask"]) > 0
            assert mask.sum() > 0
            assert mask.sum() == scene.objects[target].visible_area
            np.testing.assert_array_equal(mask, scene.objects[target].visible_mask)
            # The stored JPEG is the scene's image, up to compression.
            stored = np.asarray(row["image"], dtype=np.float32)
            assert np.abs(stored - np.asarray(scene.image, dtype=np.float32)).mean() < 4


def test_held_out_combinations_only_appear_in_test_unseen(small_dataset):
    for split in ("train", "validation", "test"):
        for image_id in set(small_dataset[split]["image_id"]):
            scene = _scene_of_row(split, {"image_id": image_id})
            assert not any(obj.is_held_out for obj in scene.objects)
    unseen = small_dataset["test_unseen"]
    for row in unseen:
        target = _scene_of_row("test_unseen", row).objects[row["object_id"] % 10]
        assert (target.color, target.shape) in HELD_OUT_COMBINATIONS
        named = parse_expression(row["expression"]).target
        assert named.color == target.color or named.shape == target.shape


def test_same_seed_gives_byte_identical_rows_and_another_seed_does_not(small_dataset, tmp_path):
    again = build_synthetic_dataset(cache_dir=tmp_path / "again", seed=0, num_images=SMALL_SIZES)
    other_seed = build_synthetic_dataset(cache_dir=tmp_path / "other", seed=1, num_images=SMALL_SIZES)
    for split in SPLITS:
        # Image columns are stored as encoded bytes, so table equality is byte equality of images and masks.
        assert again[split].data.table.equals(small_dataset[split].data.table)
        assert other_seed[split]["expression"] != small_dataset[split]["expression"]


def test_second_build_reuses_the_cache(small_dataset, cache_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the dataset was generated again instead of read from the cache")

    monkeypatch.setattr(synthetic_data, "_example_rows", fail)
    again = build_synthetic_dataset(cache_dir=cache_root, seed=0, num_images=SMALL_SIZES)
    for split in SPLITS:
        assert again[split].data.table.equals(small_dataset[split].data.table)


def test_other_settings_get_their_own_cache_entry(small_dataset, cache_root):
    before = {path.name for path in cache_root.iterdir()}
    build_synthetic_dataset(cache_dir=cache_root, seed=0, num_images={**SMALL_SIZES, "train": 3})
    after = {path.name for path in cache_root.iterdir()}
    assert len(after - before) == 1
    assert not any(name.startswith(".") for name in after)  # no temporary folder left behind


def test_interrupted_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    calls = []
    real = synthetic_data.generate_referring_scene

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic_data, "generate_referring_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_synthetic_dataset(cache_dir=tmp_path, num_images=3)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(synthetic_data, "generate_referring_scene", real)
    built = build_synthetic_dataset(cache_dir=tmp_path, num_images=3)
    assert [len(set(built[split]["image_id"])) for split in SPLITS] == [3, 3, 3, 3]


def test_num_images_rejects_unknown_splits(tmp_path):
    with pytest.raises(ValueError, match="Unknown synthref splits"):
        build_synthetic_dataset(cache_dir=tmp_path, num_images={"training": 3})


def test_cli_writes_dataset_and_preview(tmp_path):
    output, preview = tmp_path / "synthref", tmp_path / "preview.png"
    arguments = ["--output", str(output), "--seed", "3", "--preview", str(preview)]
    arguments += [argument for split in SPLITS for argument in ("--num-images", f"{split}=2")]
    synthetic_data.main(arguments)
    loaded = datasets.load_from_disk(str(output))
    assert [len(set(loaded[split]["image_id"])) for split in SPLITS] == [2, 2, 2, 2]
    with Image.open(preview) as image:
        assert image.mode == "RGB" and image.width > 200
    with pytest.raises(FileExistsError):
        synthetic_data.main(arguments)


# ---------------------------------------------------------------------------------------------------------------
# Generation on many scenes


@pytest.mark.parametrize("split, num_scenes", [("train", 150), ("test_unseen", 60)])
def test_generated_expressions_are_unambiguous_on_many_scenes(split, num_scenes):
    categories = set()
    for index in range(num_scenes):
        scene, refs = generate_referring_scene(split, index, seed=7)
        assert 3 <= len(scene.objects) <= 6
        assert 1 <= len(refs) <= 3
        for obj in scene.objects:
            assert obj.visible_area >= MIN_VISIBLE_FRACTION * obj.full_area > 0
        for ref in refs:
            texts = [text for _, text in ref.expressions]
            assert len(set(texts)) == len(texts)
            for expression, text in ref.expressions:
                assert parse_expression(text) == expression
                assert resolve(scene, expression) == {ref.object_index}, text
                assert ref.object_index in resolve(scene, expression, strict=True), text
                categories.add(expression.category)
    assert categories == set(CATEGORIES)


def test_scenes_are_deterministic_and_labels_match_objects():
    first = generate_scene(np.random.default_rng(11))
    second = generate_scene(np.random.default_rng(11))
    assert first.image.tobytes() == second.image.tobytes()
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.image.tobytes() != generate_scene(np.random.default_rng(12)).image.tobytes()
    assert set(np.unique(first.labels)) == set(range(len(first.objects) + 1))
    for index, obj in enumerate(first.objects):
        assert obj.visible_area == int((first.labels == index + 1).sum())


def test_every_template_parses_back():
    description = Description(size="big", color="red", shape="circle")
    anchor = Description(texture="striped")
    for (category, predicate), templates in TEMPLATES.items():
        expression = StructuredExpression(category, description, predicate, anchor if category == "relation" else None)
        worded = {verbalize(expression, np.random.default_rng(seed)) for seed in range(20)}
        assert len(worded) == len(templates) * (2 if category == "relation" else 1)  # "shape" / "object" for anchor
        for text in worded:
            assert parse_expression(text) == expression
    with pytest.raises(ValueError):
        parse_expression("the dog on the left")


# ---------------------------------------------------------------------------------------------------------------
# The resolver on hand-made scenes


def _scene(objects, width=150, height=100):
    """A scene of discs given as (shape, color, size, center_x, center_y, radius), drawn in order."""
    ys, xs = np.mgrid[0:height, 0:width]
    labels = np.zeros((height, width), dtype=np.uint8)
    scene_objects = []
    for index, (shape, color, size, center_x, center_y, radius) in enumerate(objects):
        disc = (xs - center_x) ** 2 + (ys - center_y) ** 2 <= radius**2
        labels[disc] = index + 1
        scene_objects.append(
            SceneObject(shape, color, size, "solid", COLORS[color], center_x, center_y, radius, 0.0, int(disc.sum()))
        )
    for index, obj in enumerate(scene_objects):
        obj.visible_mask = labels == index + 1
    return Scene(Image.new("RGB", (width, height)), labels, scene_objects)


def _expression(text):
    return parse_expression(text)


def test_location_needs_a_clear_margin():
    on_the_left = _expression("the circle on the left")
    apart = _scene([("circle", "red", "small", 20, 50, 8), ("circle", "blue", "small", 110, 50, 8)])
    assert resolve(apart, on_the_left) == {0}
    assert is_unambiguous(apart, on_the_left, 0)
    close = _scene([("circle", "red", "small", 20, 50, 8), ("circle", "blue", "small", 35, 50, 8)])
    assert resolve(close, on_the_left) == {0, 1}
    assert not is_unambiguous(close, on_the_left, 0)
    # The leftmost of two circles that are both on the right is not "on the left".
    both_right = _scene([("circle", "red", "small", 95, 50, 8), ("circle", "blue", "small", 135, 50, 8)])
    assert resolve(both_right, on_the_left) == set()


def test_relation_is_read_generously_for_the_other_objects():
    left_of = _expression("the square to the left of the red circle")
    clear = _scene(
        [
            ("circle", "red", "big", 75, 50, 10),
            ("square", "blue", "small", 30, 50, 6),
            ("square", "green", "small", 120, 50, 6),
        ]
    )
    assert resolve(clear, left_of) == {1}
    assert is_unambiguous(clear, left_of, 1)
    # A second square down and to the left also reads as "left of" the circle: ambiguous.
    diagonal = _scene(
        [
            ("circle", "red", "big", 75, 50, 10),
            ("square", "blue", "small", 30, 50, 6),
            ("square", "green", "small", 52, 80, 6),
        ]
    )
    assert resolve(diagonal, left_of) == {1, 2}
    # Only one anchor may fit the anchor's description in the strict reading.
    two_anchors = _scene(
        [
            ("circle", "red", "big", 75, 50, 10),
            ("circle", "red", "big", 120, 20, 10),
            ("square", "blue", "small", 30, 50, 6),
        ]
    )
    assert resolve(two_anchors, left_of, strict=True) == set()


def test_comparisons_need_a_clear_difference():
    biggest = _expression("the biggest circle")
    clear = _scene([("circle", "red", "big", 30, 50, 20), ("circle", "blue", "small", 110, 50, 10)])
    assert is_unambiguous(clear, biggest, 0)
    assert resolve(clear, _expression("the smallest circle")) == {1}
    similar = _scene([("circle", "red", "big", 30, 50, 20), ("circle", "blue", "big", 110, 50, 18)])
    assert resolve(similar, biggest) == {0, 1}

    second = _expression("the second circle from the left")
    spread = _scene([("circle", c, "small", x, 50, 6) for c, x in (("red", 20), ("blue", 70), ("green", 120))])
    assert resolve(spread, second) == {1}
    assert is_unambiguous(spread, second, 1)
    tied = _scene([("circle", c, "small", x, 50, 6) for c, x in (("red", 20), ("blue", 70), ("green", 78))])
    assert resolve(tied, second) == {1, 2}


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary and pretraining data


def test_vocabulary_covers_every_generated_word():
    corpus = expression_corpus(seed=0, num_scenes=30)
    assert len(corpus) > 60
    assert corpus == expression_corpus(seed=0, num_scenes=30)
    captions = [example["caption"] for example in generate_pretraining_examples(10, seed=0)]
    words = {word for text in corpus + captions for word in re.findall(r"[a-z]+", text)}
    assert words <= set(VOCABULARY)
    assert list(VOCABULARY) == sorted(set(VOCABULARY))


def test_pretraining_examples_describe_the_scene():
    examples = list(generate_pretraining_examples(8, seed=0))
    again = list(generate_pretraining_examples(8, seed=0))
    first_train_scene, _ = generate_referring_scene("train", 0, seed=0)
    assert examples[0]["image"].tobytes() != first_train_scene.image.tobytes()
    for example, repeat in zip(examples, again):
        assert example["image"].tobytes() == repeat["image"].tobytes()
        assert example["caption"] == repeat["caption"]
        maps = example["attribute_maps"]
        assert set(maps) == set(ATTRIBUTE_VALUES)
        colors, shapes = maps["color"], maps["shape"]
        assert colors.shape == (example["image"].height, example["image"].width)
        np.testing.assert_array_equal(colors == 0, shapes == 0)  # same objects, same background
        pairs = {
            (ATTRIBUTE_VALUES["color"][c - 1], ATTRIBUTE_VALUES["shape"][s - 1])
            for c, s in zip(colors[colors > 0], shapes[colors > 0])
        }
        assert not pairs & HELD_OUT_COMBINATIONS
        for color, shape in pairs:
            assert re.search(rf"\b{color} {shape}\b", example["caption"])
        assert example["caption"].count("a ") >= len(pairs)
