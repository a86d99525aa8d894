import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import List, Value
from PIL import Image

from sera_training.data_schema import EXAMPLE_FEATURES
from sera_training.hub_data import (
    BENCHMARK_SPLITS,
    load_hub_refcoco,
    load_hub_refcoco_benchmark,
    parquet_files_by_split,
)
from tests.helpers.coco_fixtures import column_major_runs, rectangle_mask, rectangle_polygon


# The column schemas of the Hub repos, as their dataset cards (README.md `dataset_info`) declare them.
SENTENCES = List(
    {"raw": Value("string"), "sent": Value("string"), "sent_id": Value("int64"), "tokens": List(Value("string"))}
)
MIRROR_FEATURES = datasets.Features(
    {
        "sent_ids": List(Value("int64")),
        "file_name": Value("string"),
        "ann_id": Value("int64"),
        "ref_id": Value("int64"),
        "image_id": Value("int64"),
        "split": Value("string"),
        "sentences": SENTENCES,
        "category_id": Value("int64"),
        "raw_anns": Value("string"),
        "raw_image_info": Value("string"),
        "raw_sentences": Value("string"),
        "image_path": Value("string"),
        "bbox": List(Value("float64")),
        "captions": List(Value("string")),
        "global_image_id": Value("string"),
        "anns_id": Value("string"),
    }
)
BENCHMARK_FEATURES = datasets.Features(
    {
        "ref_list": List(
            {
                "ann_info": {
                    "area": Value("float64"),
                    "bbox": List(Value("float64")),
                    "category_id": Value("int64"),
                    "id": Value("int64"),
                    "image_id": Value("int64"),
                    "iscrowd": Value("int64"),
                    "segmentation": List(List(Value("float64"))),
                },
                "ref_info": {
                    "ann_id": Value("int64"),
                    "category_id": Value("int64"),
                    "file_name": Value("string"),
                    "image_id": Value("int64"),
                    "ref_id": Value("int64"),
                    "sent_ids": List(Value("int64")),
                    "sentences": SENTENCES,
                    "split": Value("string"),
                },
            }
        ),
        "image_info": {
            "coco_url": Value("string"),
            "date_captured": Value("string"),
            "file_name": Value("string"),
            "flickr_url": Value("string"),
            "height": Value("int64"),
            "id": Value("int64"),
            "license": Value("int64"),
            "width": Value("int64"),
        },
        "image": datasets.Image(),
    }
)


def encoded_image(pixels, format):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def coco_name(image_id):
    return f"COCO_train2014_{image_id:012d}.jpg"


def sentences(ref_id, *texts):
    return [
        {"raw": text, "sent": text, "sent_id": ref_id * 10 + index, "tokens": text.split()}
        for index, text in enumerate(texts)
    ]


def annotation(ann_id, image_id, segmentation):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": segmentation,
        "area": 1.0,
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "iscrowd": int(isinstance(segmentation, dict)),
    }


SIZES = {1: (30, 40), 2: (24, 32), 8: (20, 20)}  # (height, width)
CROWD = rectangle_mask(20, 20, (0, 0, 3, 20), (10, 5, 20, 8))


def mirror_row(ref_id, ann_id, image_id, split, texts, segmentation, raw_anns=None, image_info=None):
    height, width = SIZES.get(image_id, (10, 10))
    if image_info is None:
        image_info = {"id": image_id, "file_name": coco_name(image_id), "height": height, "width": width}
    return {
        "sent_ids": [ref_id * 10 + index for index in range(len(texts))],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "ann_id": ann_id,
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": sentences(ref_id, *texts),
        "category_id": 1,
        "raw_anns": raw_anns if raw_anns is not None else json.dumps(annotation(ann_id, image_id, segmentation)),
        "raw_image_info": json.dumps(image_info),
        "raw_sentences": json.dumps(sentences(ref_id, *texts)),
        "image_path": f"coco/train2014/{coco_name(image_id)}",
        "bbox": [0.0, 0.0, 1.0, 1.0],
        "captions": list(texts),
        "global_image_id": f"coco.{image_id}",
        "anns_id": f"refcoco.{ann_id}",
    }


def write_parquet_splits(folder: Path, splits: dict, features):
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        path = folder / "data" / f"{split}-00000-of-00001-0123456789abcdef.parquet"
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return folder


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train2014")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / coco_name(1))
    Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8)).save(folder / coco_name(2))  # grayscale JPEG
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / coco_name(8))
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def refcoco_mirror(tmp_path_factory):
    splits = {
        "validation": [
            mirror_row(1, 101, 1, "val", ["left man", "guy"], [rectangle_polygon(5, 5, 15, 20)]),
            mirror_row(
                2, 102, 2, "val", ["two parts", ""], [rectangle_polygon(0, 0, 4, 4), rectangle_polygon(20, 10, 32, 24)]
            ),
            mirror_row(3, 103, 1, "val", ["sliver"], [[1, 1, 5, 5]]),
            mirror_row(4, 104, 5, "val", ["lost"], [rectangle_polygon(1, 1, 5, 5)]),
            mirror_row(5, 105, 1, "val", ["garbled"], None, raw_anns="{not json"),
            # No file_name in raw_image_info: the image is found by COCO's own naming.
            mirror_row(
                6,
                106,
                8,
                "val",
                ["the crowd"],
                {"size": [20, 20], "counts": column_major_runs(CROWD)},
                image_info={"id": 8, "height": 20, "width": 20},
            ),
        ],
        "test": [mirror_row(7, 101, 1, "testA", ["man in testA"], [rectangle_polygon(5, 5, 15, 20)])],
        "testB": [mirror_row(8, 102, 2, "testB", ["parts in testB"], [rectangle_polygon(0, 0, 4, 4)])],
        "train": [mirror_row(9, 101, 1, "train", ["man in train"], [rectangle_polygon(5, 5, 15, 20)])],
    }
    return write_parquet_splits(tmp_path_factory.mktemp("refcoco"), splits, MIRROR_FEATURES)


@pytest.fixture(scope="module")
def refcocog_mirror(tmp_path_factory):
    splits = {
        "validation": [mirror_row(11, 101, 1, "val", ["a man"], [rectangle_polygon(5, 5, 15, 20)])],
        "test": [mirror_row(12, 101, 1, "test", ["the man standing"], [rectangle_polygon(5, 5, 15, 20)])],
    }
    return write_parquet_splits(tmp_path_factory.mktemp("refcocog"), splits, MIRROR_FEATURES)


EXPECTED_MIRROR_VAL = {
    (1, 10): ("left man", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20))),
    (1, 11): ("guy", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20))),
    (2, 20): ("two parts", 2, 102, rectangle_mask(24, 32, (0, 0, 4, 4), (20, 10, 32, 24))),
    (6, 60): ("the crowd", 8, 106, CROWD),
}


def assert_rows_match(dataset, expected):
    assert dataset.features == EXAMPLE_FEATURES
    assert len(dataset) == len(expected)
    for example in dataset:
        expression, image_id, ann_id, mask = expected[(example["ref_id"], example["sentence_id"])]
        assert (example["expression"], example["image_id"], example["object_id"]) == (expression, image_id, ann_id)
        assert example["mask"].mode == "L"
        assert example["mask"].size == example["image"].size == (mask.shape[1], mask.shape[0])
        pixels = np.asarray(example["mask"])
        assert set(np.unique(pixels)) <= {0, 255}
        np.testing.assert_array_equal(pixels == 255, mask)


def test_mirror_validation_split(refcoco_mirror, coco_dir, cache_dir):
    dataset, skipped = load_hub_refcoco(
        refcoco_mirror, "validation", coco_dir, cache_dir=cache_dir, return_skipped=True
    )
    assert_rows_match(dataset, EXPECTED_MIRROR_VAL)
    assert set(dataset["source"]) == {refcoco_mirror.name}
    assert dataset[dataset["image_id"].index(2)]["image"].mode == "L"
    assert dict(skipped.counts) == {
        "empty sentence": 1,
        "polygon with fewer than 3 points": 1,
        "missing image file": 1,
        "unreadable JSON in the row": 1,
    }


def test_refer_split_names_map_to_the_mirror_splits(refcoco_mirror, coco_dir, cache_dir):
    val = load_hub_refcoco(refcoco_mirror, "val", coco_dir, cache_dir=cache_dir)
    assert sorted(val["ref_id"]) == [1, 1, 2, 6]
    # The mirrors' "test" split is RefCOCO's testA; both names load it.
    assert load_hub_refcoco(refcoco_mirror, "testA", coco_dir, cache_dir=cache_dir)["expression"] == ["man in testA"]
    assert load_hub_refcoco(refcoco_mirror, "test", coco_dir, cache_dir=cache_dir)["expression"] == ["man in testA"]
    assert load_hub_refcoco(refcoco_mirror, "testB", coco_dir, cache_dir=cache_dir)["expression"] == ["parts in testB"]


def test_refcocog_mirror_has_test_but_no_testA(refcocog_mirror, coco_dir, cache_dir):
    test = load_hub_refcoco(refcocog_mirror, "test", coco_dir, cache_dir=cache_dir)
    assert test["expression"] == ["the man standing"]
    with pytest.raises(ValueError, match="REFER split\\(s\\) test, not 'testA'"):
        load_hub_refcoco(refcocog_mirror, "testA", coco_dir, cache_dir=cache_dir)


def test_unknown_local_split_lists_the_splits_present(refcoco_mirror, coco_dir, cache_dir):
    with pytest.raises(ValueError, match="'testC' not found .*test, testB, train, validation"):
        load_hub_refcoco(refcoco_mirror, "testC", coco_dir, cache_dir=cache_dir)


def test_missing_coco_folder_is_a_clear_error(refcoco_mirror, tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO train2014 image folder not found: .*nowhere"):
        load_hub_refcoco(refcoco_mirror, "validation", tmp_path / "nowhere")


def test_a_folder_of_the_wrong_schema_is_refused(tmp_path, coco_dir, cache_dir):
    folder = write_parquet_splits(tmp_path / "other", {"validation": [{"text": "hi"}]}, None)
    with pytest.raises(ValueError, match="expected columns ref_id, ann_id"):
        load_hub_refcoco(folder, "validation", coco_dir, cache_dir=cache_dir)


def test_all_bad_split_raises(tmp_path, coco_dir, cache_dir):
    folder = write_parquet_splits(
        tmp_path / "bad",
        {"validation": [mirror_row(1, 1, 5, "val", ["lost"], [rectangle_polygon(1, 1, 5, 5)])]},
        MIRROR_FEATURES,
    )
    with pytest.raises(ValueError, match="no usable records.*1 x missing image file"):
        load_hub_refcoco(folder, "validation", coco_dir, cache_dir=cache_dir)


def test_hub_ids_go_through_load_dataset_with_the_hub_split_name(refcoco_mirror, coco_dir, cache_dir, monkeypatch):
    calls = []

    def fake_load_dataset(path, split, cache_dir=None):
        calls.append((path, split))
        return datasets.Dataset.from_parquet(
            next(str(p) for p in (refcoco_mirror / "data").glob(f"{split}-*")), cache_dir=cache_dir
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_hub_refcoco("jxu124/refcoco", "testA", coco_dir, cache_dir=cache_dir)
    assert calls == [("jxu124/refcoco", "test")]
    assert dataset["source"] == ["jxu124/refcoco"]


def test_parquet_files_are_grouped_by_split_in_every_hub_layout(tmp_path):
    names = [
        "data/train-00000-of-00002-abc.parquet",
        "data/train-00001-of-00002-abc.parquet",
        "data/refcoco_unc_testA-00000-of-00001-60999d2a63f64700.parquet",
        "default/validation/0000.parquet",
        "testB.parquet",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    grouped = {
        split: [path.relative_to(tmp_path).as_posix() for path in paths]
        for split, paths in parquet_files_by_split(tmp_path).items()
    }
    assert grouped == {
        "train": names[:2],
        "refcoco_unc_testA": [names[2]],
        "validation": [names[3]],
        "testB": [names[4]],
    }


def benchmark_entry(ref_id, ann_id, image_id, texts, segmentation):
    return {
        "ann_info": annotation(ann_id, image_id, segmentation),
        "ref_info": {
            "ann_id": ann_id,
            "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            "image_id": image_id,
            "ref_id": ref_id,
            "sent_ids": [ref_id * 10 + index for index in range(len(texts))],
            "sentences": sentences(ref_id, *texts),
            "split": "val",
        },
    }


def benchmark_row(image_id, image_bytes, height, width, entries):
    return {
        "ref_list": entries,
        "image_info": {
            "coco_url": f"http://images.cocodataset.org/train2014/{coco_name(image_id)}",
            "date_captured": "2013-11-14 16:28:13",
            "file_name": coco_name(image_id),
            "flickr_url": "",
            "height": height,
            "id": image_id,
            "license": 1,
            "width": width,
        },
        "image": {"bytes": image_bytes, "path": None},
    }


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    rng = np.random.default_rng(1)
    rgb = encoded_image(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), "JPEG")
    gray = encoded_image(rng.integers(0, 255, (24, 32), dtype=np.uint8), "PNG")
    small = encoded_image(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8), "PNG")
    box, man = rectangle_polygon(2, 3, 10, 20), rectangle_polygon(5, 5, 15, 20)
    splits = {
        "refcoco_unc_val": [
            benchmark_row(
                1,
                rgb,
                30,
                40,
                [
                    benchmark_entry(1, 101, 1, ["left man", "guy"], [rectangle_polygon(5, 5, 15, 20)]),
                    benchmark_entry(
                        2, 102, 1, ["two parts"], [rectangle_polygon(0, 0, 4, 4), rectangle_polygon(30, 10, 40, 30)]
                    ),
                    benchmark_entry(3, 103, 1, ["sliver"], [[1, 1, 5, 5]]),
                ],
            ),
            benchmark_row(2, gray, 24, 32, [benchmark_entry(4, 104, 2, ["grey thing", " "], [box])]),
            benchmark_row(3, b"not an image", 10, 10, [benchmark_entry(5, 105, 3, ["a", "b"], [box])]),
            benchmark_row(4, small, 12, 12, [benchmark_entry(6, 106, 4, ["wrong size"], [box])]),
        ],
        "refcocog_umd_val": [
            benchmark_row(1, rgb, 30, 40, [benchmark_entry(7, 101, 1, ["the man on the left"], [man])]),
        ],
    }
    return write_parquet_splits(tmp_path_factory.mktemp("refcoco-benchmark"), splits, BENCHMARK_FEATURES)


EXPECTED_BENCHMARK = {
    (1, 10): ("left man", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20))),
    (1, 11): ("guy", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20))),
    (2, 20): ("two parts", 1, 102, rectangle_mask(30, 40, (0, 0, 4, 4), (30, 10, 40, 30))),
    (4, 40): ("grey thing", 2, 104, rectangle_mask(24, 32, (2, 3, 10, 20))),
}


def test_benchmark_rows_are_exploded_to_one_example_per_sentence(benchmark, cache_dir):
    dataset, skipped = load_hub_refcoco_benchmark(
        benchmark, "refcoco_unc_val", cache_dir=cache_dir, return_skipped=True
    )
    assert_rows_match(dataset, EXPECTED_BENCHMARK)
    assert set(dataset["source"]) == {f"{benchmark.name}:refcoco_unc_val"}
    assert dataset[dataset["image_id"].index(2)]["image"].mode == "L"
    assert dict(skipped.counts) == {
        "polygon with fewer than 3 points": 1,
        "empty sentence": 1,
        "unreadable image": 2,
        "image size differs from its annotation": 1,
    }


def test_benchmark_examples_keep_the_embedded_image_bytes(benchmark, cache_dir):
    dataset = load_hub_refcoco_benchmark(benchmark, "refcocog_umd_val", cache_dir=cache_dir)
    stored = dataset.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert stored["bytes"][:2] == b"\xff\xd8"  # the original JPEG, not a re-encoding
    assert dataset["expression"] == ["the man on the left"]


def test_benchmark_split_names_are_checked(benchmark, cache_dir):
    with pytest.raises(ValueError, match="'refcoco_unc_testA' not found .*refcoco_unc_val, refcocog_umd_val"):
        load_hub_refcoco_benchmark(benchmark, "refcoco_unc_testA", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="Unknown benchmark split 'val'.*refcoco_plus_unc_testB"):
        load_hub_refcoco_benchmark("jxu124/refcoco-benchmark", "val")
    assert len(BENCHMARK_SPLITS) == 11


def test_benchmark_hub_id_goes_through_load_dataset(benchmark, cache_dir, monkeypatch):
    calls = []

    def fake_load_dataset(path, split, cache_dir=None):
        calls.append((path, split))
        return datasets.Dataset.from_parquet(
            next(str(p) for p in (benchmark / "data").glob(f"{split}-*")), cache_dir=cache_dir
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_hub_refcoco_benchmark("jxu124/refcoco-benchmark", "refcocog_umd_val", cache_dir=cache_dir)
    assert calls == [("jxu124/refcoco-benchmark", "refcocog_umd_val")]
    assert dataset["source"] == ["jxu124/refcoco-benchmark:refcocog_umd_val"]


def test_benchmark_parquet_without_datasets_metadata(benchmark, tmp_path, cache_dir):
    # Written by another tool, the image column is a plain {bytes, path} struct rather than a `datasets.Image`.
    source = next((benchmark / "data").glob("refcocog_umd_val-*"))
    table = pq.read_table(source)
    (tmp_path / "plain").mkdir()
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "plain" / "refcocog_umd_val.parquet")

    dataset = load_hub_refcoco_benchmark(tmp_path / "plain", "refcocog_umd_val", cache_dir=cache_dir)
    assert_rows_match(dataset, {(7, 70): ("the man on the left", 1, 101, rectangle_mask(30, 40, (5, 5, 15, 20)))})
