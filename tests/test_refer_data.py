import io
import json
import logging
import os
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sera_training.data_schema import EXAMPLE_FEATURES
from sera_training.refer_data import load_refer_dataset
from tests.helpers.coco_fixtures import column_major_runs, rectangle_mask, rectangle_polygon


def save_image(path, pixels, format, exif_orientation=None):
    image = Image.fromarray(pixels)
    options = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif.tobytes()
    image.save(path, format=format, **options)


def ref(ref_id, ann_id, image_id, split, *sentences):
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "split": split,
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "sent_ids": [ref_id * 10 + index for index in range(len(sentences))],
        "sentences": [
            {"sent": text, "raw": text, "tokens": text.split(), "sent_id": ref_id * 10 + index}
            for index, text in enumerate(sentences)
        ],
    }


# (height, width) of each fixture image, as instances.json declares them.
SIZES = {1: (30, 40), 2: (24, 32), 3: (16, 24), 4: (20, 20), 5: (10, 10), 6: (20, 30), 7: (20, 20)}
EXIF_RECTANGLE = (5, 4, 12, 16)
RING = rectangle_mask(16, 24, (2, 2, 20, 14)) & ~rectangle_mask(16, 24, (8, 6, 12, 10))
CROWD = rectangle_mask(24, 32, (2, 3, 10, 20), (20, 0, 32, 5))


def write_refer_root(root: Path):
    """A miniature REFER data folder: COCO images, refcoco/instances.json and refcoco/refs(unc).p."""
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_image(images / "COCO_train2014_000000000001.jpg", rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "JPEG")
    save_image(images / "COCO_train2014_000000000002.jpg", rng.integers(0, 255, (24, 32), dtype=np.uint8), "JPEG")
    save_image(images / "COCO_train2014_000000000003.png", rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), "PNG")
    # A truncated JPEG: it opens, and only fails once decoded.
    buffer = io.BytesIO()
    save_image(buffer, rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), "JPEG")
    (images / "COCO_train2014_000000000004.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    # Image 5 is declared in instances.json but its file is missing.
    # Image 6 is stored 30 wide x 20 high with "rotate 90 degrees clockwise" in its EXIF; the object is white.
    exif_pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    exif_pixels[rectangle_mask(20, 30, EXIF_RECTANGLE)] = 255
    save_image(images / "COCO_train2014_000000000006.png", exif_pixels, "PNG", exif_orientation=6)
    # Image 7 is 16x16 on disk but 20x20 in instances.json.
    save_image(images / "COCO_train2014_000000000007.png", np.zeros((16, 16), dtype=np.uint8), "PNG")

    file_names = {image_id: f"COCO_train2014_{image_id:012d}.jpg" for image_id in SIZES}
    file_names[3] = "COCO_train2014_000000000003.png"
    file_names[6] = "COCO_train2014_000000000006.png"
    file_names[7] = "COCO_train2014_000000000007.png"

    def annotation(ann_id, image_id, segmentation, iscrowd=0):
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": 1,
            "segmentation": segmentation,
            "area": 0.0,
            "bbox": [0.0, 0.0, 1.0, 1.0],
            "iscrowd": iscrowd,
        }

    ring_counts = mask_utils.encode(np.asfortranarray(RING.astype(np.uint8)))["counts"].decode("ascii")
    instances = {
        "images": [
            {"id": image_id, "file_name": file_names[image_id], "height": height, "width": width}
            for image_id, (height, width) in SIZES.items()
        ],
        "annotations": [
            annotation(101, 1, [rectangle_polygon(5, 5, 15, 20)]),
            annotation(102, 1, [rectangle_polygon(0, 0, 4, 4), rectangle_polygon(30, 10, 40, 30)]),
            annotation(103, 2, {"size": [24, 32], "counts": column_major_runs(CROWD)}, iscrowd=1),
            annotation(104, 3, {"size": [16, 24], "counts": ring_counts}),
            annotation(105, 1, [[1, 1, 5, 5]]),
            annotation(106, 4, [rectangle_polygon(1, 1, 5, 5)]),
            annotation(107, 5, [rectangle_polygon(1, 1, 5, 5)]),
            annotation(108, 6, [rectangle_polygon(*EXIF_RECTANGLE)]),
            annotation(109, 7, [rectangle_polygon(1, 1, 5, 5)]),
            annotation(110, 1, [rectangle_polygon(50, 50, 60, 60)]),
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    refs = [
        ref(1, 101, 1, "val", "man on the left", "guy"),
        ref(2, 102, 1, "val", "two pieces", "   "),
        ref(3, 103, 2, "val", "crowd in grey"),
        ref(4, 104, 3, "val", "the ring", "donut shape"),
        ref(5, 105, 1, "val", "sliver", "thin thing"),
        ref(6, 106, 4, "val", "broken picture"),
        ref(7, 107, 5, "val", "lost picture"),
        ref(8, 999, 1, "val", "nothing", "still nothing"),
        ref(9, 108, 6, "val", "white box"),
        ref(10, 109, 7, "val", "wrong size"),
        ref(11, 110, 1, "val", "off the image"),
        ref(12, 101, 1, "testA", "man again"),
        ref(13, 106, 4, "testB", "broken again"),
        ref(14, 102, 1, "train", "two pieces again"),
        ref(15, 101, 1, "val"),  # no sentence at all
        "not a ref",
    ]
    (root / "refcoco").mkdir()
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return root


# (ref_id, sentence_id) -> (expression, image_id, ann_id, expected mask as stored on disk)
EXPECTED_VAL = {
    (1, 10): ("man on the left", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20))),
    (1, 11): ("guy", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20))),
    (2, 20): ("two pieces", 1, 102, rectangle_mask(30, 40, (0, 0, 4, 4), (30, 10, 40, 30))),
    (3, 30): ("crowd in grey", 2, 103, CROWD),
    (4, 40): ("the ring", 3, 104, RING),
    (4, 41): ("donut shape", 3, 104, RING),
    (9, 90): ("white box", 6, 108, rectangle_mask(20, 30, EXIF_RECTANGLE)),
}
EXPECTED_VAL_SKIPS = {
    "empty sentence": 1,
    "polygon with fewer than 3 points": 2,
    "unreadable image": 1,
    "missing image file": 1,
    "ref points at a missing annotation": 2,
    "image size differs from its annotation": 1,
    "empty mask": 1,
    "malformed ref": 2,
}


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory):
    return write_refer_root(tmp_path_factory.mktemp("refer"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def val_split(refer_root, cache_dir):
    return load_refer_dataset(refer_root, "refcoco", "unc", "val", cache_dir=cache_dir, return_skipped=True)


def test_val_split_has_one_row_per_usable_sentence_in_the_schema(val_split):
    dataset, _ = val_split
    assert dataset.features == EXAMPLE_FEATURES
    assert len(dataset) == len(EXPECTED_VAL)
    assert set(zip(dataset["ref_id"], dataset["sentence_id"])) == set(EXPECTED_VAL)
    assert set(dataset["source"]) == {"refcoco(unc)"}
    assert set(dataset["category"]) == {""}


def test_val_split_masks_match_the_annotations_pixel_by_pixel(val_split):
    dataset, _ = val_split
    for example in dataset:
        expression, image_id, ann_id, expected = EXPECTED_VAL[(example["ref_id"], example["sentence_id"])]
        assert (example["expression"], example["image_id"], example["object_id"]) == (expression, image_id, ann_id)
        mask = example["mask"]
        assert mask.mode == "L"
        pixels = np.asarray(mask)
        assert set(np.unique(pixels)) == {0, 255}
        if image_id == 6:
            continue  # EXIF-rotated, checked on its own below
        assert mask.size == example["image"].size == (expected.shape[1], expected.shape[0])
        np.testing.assert_array_equal(pixels == 255, expected)


def test_grayscale_jpeg_is_kept_as_is(val_split):
    dataset, _ = val_split
    example = dataset[[row for row, image_id in enumerate(dataset["image_id"]) if image_id == 2][0]]
    assert example["image"].mode == "L"
    assert example["image"].size == (32, 24)


def test_images_are_stored_by_path_not_copied(val_split, refer_root):
    dataset, _ = val_split
    stored = dataset.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert stored["bytes"] is None
    assert Path(stored["path"]).parent == refer_root / "images" / "mscoco" / "images" / "train2014"


def test_mask_follows_the_exif_rotation_that_datasets_applies_to_the_image(val_split):
    dataset, _ = val_split
    example = dataset[dataset["ref_id"].index(9)]
    image, mask = np.asarray(example["image"].convert("L")), np.asarray(example["mask"])
    # Stored 30 wide x 20 high; EXIF orientation 6 turns it 90 degrees clockwise when decoded.
    assert image.shape == mask.shape == (30, 20)
    np.testing.assert_array_equal(mask == 255, np.rot90(rectangle_mask(20, 30, EXIF_RECTANGLE), k=-1))
    np.testing.assert_array_equal(mask == 255, image > 127)


def test_bad_records_are_counted_by_reason_and_logged(refer_root, cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="refer_data"):
        _, skipped = load_refer_dataset(refer_root, split="val", cache_dir=cache_dir, return_skipped=True)
    assert dict(skipped.counts) == EXPECTED_VAL_SKIPS
    assert skipped.source == "refcoco(unc)"
    assert "skipped 11 records" in caplog.text
    assert "2 x ref points at a missing annotation" in caplog.text


def test_other_splits_select_their_own_refs(refer_root, cache_dir):
    test_a = load_refer_dataset(refer_root, split="testA", cache_dir=cache_dir)
    assert list(zip(test_a["ref_id"], test_a["expression"])) == [(12, "man again")]
    train = load_refer_dataset(refer_root, split="train", cache_dir=cache_dir)
    assert list(zip(train["ref_id"], train["expression"])) == [(14, "two pieces again")]


def test_a_split_where_everything_is_bad_raises(refer_root, cache_dir):
    with pytest.raises(ValueError, match="no usable records.*1 x unreadable image"):
        load_refer_dataset(refer_root, split="testB", cache_dir=cache_dir)


def test_unknown_split_lists_the_splits_present(refer_root, cache_dir):
    with pytest.raises(ValueError, match="'test' is not in .*refs\\(unc\\)\\.p.*testA, testB, train, val"):
        load_refer_dataset(refer_root, split="test", cache_dir=cache_dir)


def test_a_dataset_folder_that_is_not_there_names_the_folders_that_are(refer_root):
    message = "dataset folder not found: .*refclef.*folders with refs files there are: refcoco"
    with pytest.raises(FileNotFoundError, match=message):
        load_refer_dataset(refer_root, dataset="refclef")


def write_refclef_root(root: Path, dataset: str):
    """A REFER folder in RefCLEF's form: saiapr_tc-12 images, segmentations as lists of compressed-RLE dicts, and
    sentences written by Python 2 as UTF-8 byte strings (non-ASCII text)."""
    images = root / "images" / "saiapr_tc-12" / "25" / "images"
    images.mkdir(parents=True)
    save_image(images / "25000.jpg", np.full((20, 30, 3), 128, dtype=np.uint8), "JPEG")
    first, second = rectangle_mask(20, 30, (2, 3, 9, 12)), rectangle_mask(20, 30, (20, 10, 28, 18))
    rles = [mask_utils.encode(np.asfortranarray(part.astype(np.uint8))) for part in (first, second)]
    segmentation = [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]
    instances = {
        "images": [{"id": 25000, "file_name": "25/images/25000.jpg", "height": 20, "width": 30}],
        "annotations": [
            {"id": 1, "image_id": 25000, "category_id": 1, "segmentation": segmentation, "iscrowd": 0},
            # One degenerate part (2 points) next to a valid one: only the bad part goes.
            {
                "id": 2,
                "image_id": 25000,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[1, 1, 4, 4], rectangle_polygon(12, 2, 18, 8)],
            },
        ],
    }
    # What a Python 2 pickle of UTF-8 byte strings looks like once loaded with encoding="latin1".
    mojibake = "café car".encode().decode("latin-1")
    assert mojibake == "cafÃ© car"
    refs = [ref(1, 1, 25000, "test", mojibake, "both boxes"), ref(2, 2, 25000, "test", "the small box ☃")]
    (root / dataset).mkdir()
    (root / dataset / "instances.json").write_text(json.dumps(instances))
    (root / dataset / "refs(berkeley).p").write_bytes(pickle.dumps(refs, protocol=2))
    return first | second, rectangle_mask(20, 30, (12, 2, 18, 8))


@pytest.mark.parametrize("dataset", ["refclef", "my-referring-data"])
def test_refclef_and_other_folder_names_load_with_rle_lists_degenerate_parts_and_python2_text(
    dataset, tmp_path, cache_dir
):
    both, small = write_refclef_root(tmp_path, dataset)
    image_dir = None if dataset == "refclef" else tmp_path / "images" / "saiapr_tc-12"  # refclef's is the default
    examples, skipped = load_refer_dataset(
        tmp_path, dataset, "berkeley", "test", image_dir=image_dir, cache_dir=cache_dir, return_skipped=True
    )
    assert not skipped.counts, dict(skipped.counts)
    assert examples["source"] == [f"{dataset}(berkeley)"] * 3
    assert examples["expression"] == ["café car", "both boxes", "the small box ☃"]
    for example, expected in zip(examples, (both, both, small)):
        np.testing.assert_array_equal(np.asarray(example["mask"]) == 255, expected)


def test_missing_refs_file_names_the_path_and_the_layout(refer_root):
    with pytest.raises(FileNotFoundError) as error:
        load_refer_dataset(refer_root, split_by="google")
    message = str(error.value)
    assert str(refer_root / "refcoco" / "refs(google).p") in message
    assert "Refs files in" in message and "refs(unc).p" in message
    assert "images/mscoco/images/train2014" in message


def test_missing_instances_json_names_the_path(tmp_path):
    (tmp_path / "refcoco").mkdir()
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([], protocol=2))
    with pytest.raises(FileNotFoundError, match="instances.json not found: .*refcoco/instances.json"):
        load_refer_dataset(tmp_path)


def test_missing_image_folder_names_the_path_and_the_option(refer_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere.*image_dir="):
        load_refer_dataset(refer_root, image_dir=tmp_path / "nowhere")


def test_refcocog_umd_with_an_explicit_image_dir(refer_root, tmp_path, cache_dir):
    root = tmp_path / "other"
    (root / "refcocog").mkdir(parents=True)
    instances = json.loads((refer_root / "refcoco" / "instances.json").read_text())
    (root / "refcocog" / "instances.json").write_text(json.dumps(instances))
    refs = [ref(21, 101, 1, "test", "a man"), ref(22, 102, 1, "val", "pieces")]
    (root / "refcocog" / "refs(umd).p").write_bytes(pickle.dumps(refs, protocol=2))
    image_dir = refer_root / "images" / "mscoco" / "images" / "train2014"

    dataset = load_refer_dataset(root, "refcocog", "umd", "test", image_dir=image_dir, cache_dir=cache_dir)

    assert dataset["source"] == ["refcocog(umd)"]
    assert dataset["expression"] == ["a man"]
    np.testing.assert_array_equal(np.asarray(dataset[0]["mask"]) == 255, rectangle_mask(30, 40, (5, 5, 15, 20)))


def test_a_refs_file_that_runs_code_is_refused(refer_root, tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch '{tmp_path / 'pwned'}'",))

    root = tmp_path / "evil"
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "instances.json").write_text("{}")
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Exploit()], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_refer_dataset(root, image_dir=refer_root / "images" / "mscoco" / "images" / "train2014")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "refs_bytes, instances_text, message",
    [
        (pickle.dumps([{"ref_id": 1}], protocol=2)[:9], "{}", r"refs\(unc\)\.p is not a readable REFER refs pickle"),
        (b"[1, 2, 3]", "{}", r"refs\(unc\)\.p is not a readable REFER refs pickle"),
        (None, '{"images": [{"id": 1, "file_na', "instances.json is not valid JSON"),
        (None, "[]", "should hold a COCO object .* found a list"),
        (
            None,
            '{"images": [], "annotations": {"id": 7}}',
            "'annotations' should be a list of objects with an 'id', found dict",
        ),
        (
            None,
            '{"images": [], "annotations": [{"image_id": 1}]}',
            "'annotations' should be a list of objects with an 'id'",
        ),
        (None, '{"images": [], "annotations": [{"id": 7}, {"id": 7}]}', r"'annotations' has duplicate ids \['7'\]"),
    ],
)
def test_damaged_annotation_files_are_one_clear_error_that_names_the_file(
    refs_bytes, instances_text, message, tmp_path
):
    (tmp_path / "refcoco").mkdir()
    refs = pickle.dumps([ref(1, 7, 1, "val", "the box")], protocol=2) if refs_bytes is None else refs_bytes
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(refs)
    (tmp_path / "refcoco" / "instances.json").write_text(instances_text)
    with pytest.raises(ValueError, match=message) as error:
        load_refer_dataset(tmp_path, image_dir=tmp_path)
    assert "\n" not in str(error.value)
