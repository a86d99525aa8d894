"""Tests for training/data_sources.py: parsing ``--data`` values and dispatching to the right loader.

The loaders are replaced by recording stand-ins, so these tests check the dispatch, not the loaders (which have their
own tests).
"""

import sys
import types

import pytest

import sera_training
from sera_training import data_sources
from sera_training.data_sources import DataSource, load_examples, parse_source


BENCHMARK_SPLITS = ("refcoco_unc_val", "refcoco_unc_testA")


@pytest.fixture
def loader_calls(monkeypatch):
    """Stand-in synthetic_data, refer_data and hub_data modules that record how they were called."""
    calls = []

    def record(name):
        def loader(*args, **kwargs):
            calls.append((name, args, kwargs))
            return f"{name} result"

        return loader

    synthetic = types.SimpleNamespace(
        build_synthetic_dataset=lambda: {"train": "synthetic train", "val": "synthetic val"}
    )
    refer = types.SimpleNamespace(load_refer_dataset=record("refer"))
    hub = types.SimpleNamespace(
        BENCHMARK_SPLITS=BENCHMARK_SPLITS,
        load_hub_refcoco=record("hub"),
        load_hub_refcoco_benchmark=record("benchmark"),
    )
    for name, module in (("synthetic_data", synthetic), ("refer_data", refer), ("hub_data", hub)):
        monkeypatch.setitem(sys.modules, f"sera_training.{name}", module)
        monkeypatch.setattr(sera_training, name, module, raising=False)
    return calls


def test_parse_source_forms(tmp_path):
    assert parse_source("synthref") == DataSource(kind="synthetic")
    assert parse_source("refer:/data/refer:refcoco+:unc") == DataSource("refer", "/data/refer", "refcoco+", "unc")
    assert parse_source("refer:C:/refer:refcocog:umd").location == "C:/refer"  # a root with a colon
    assert parse_source("jxu124/refcoco") == DataSource(kind="hub", location="jxu124/refcoco")
    assert parse_source(tmp_path) == DataSource(kind="hub", location=str(tmp_path))


def test_source_names_have_no_local_paths(tmp_path):
    assert parse_source("synthref").name == "synthref"
    assert parse_source("refer:/data/refer:refcoco:unc").name == "refcoco(unc)"
    assert parse_source("jxu124/refcoco-benchmark").name == "jxu124/refcoco-benchmark"
    folder = tmp_path / "refcocog_parquet"
    folder.mkdir()
    assert parse_source(folder).name == "refcocog_parquet"


@pytest.mark.parametrize(
    "source", ["coco", "refer:/data/refer:refcoco", "refer:::", "./no/such/folder/here", "./refcoco"]
)
def test_unknown_source_is_a_clear_error(source):
    with pytest.raises(ValueError, match="source"):
        parse_source(source)


def test_synthetic_source(loader_calls):
    assert load_examples("synthref", "val") == "synthetic val"
    with pytest.raises(ValueError, match="no split 'testA'; its splits are: train, val"):
        load_examples("synthref", "testA")


def test_refer_source(loader_calls):
    assert load_examples("refer:/data/refer:refcocog:umd", "test", coco_image_dir="/coco") == "refer result"
    assert loader_calls == [
        ("refer", ("/data/refer",), {"dataset": "refcocog", "split_by": "umd", "split": "test", "image_dir": "/coco"})
    ]


def test_hub_sources(loader_calls, tmp_path):
    assert load_examples("jxu124/refcoco", "val", coco_image_dir="/coco") == "hub result"
    assert load_examples("jxu124/refcoco-benchmark", "refcoco_unc_val") == "benchmark result"
    assert load_examples(tmp_path, "refcoco_unc_testA") == "benchmark result"  # local copy, told by its split name
    assert loader_calls == [
        ("hub", ("jxu124/refcoco", "val", "/coco"), {}),
        ("benchmark", ("jxu124/refcoco-benchmark", "refcoco_unc_val"), {}),
        ("benchmark", (str(tmp_path), "refcoco_unc_testA"), {}),
    ]


def test_hub_mirror_without_images_needs_coco_folder(loader_calls):
    with pytest.raises(ValueError, match="--coco_image_dir"):
        load_examples("jxu124/refcoco", "val")
    assert loader_calls == []


def test_loaders_are_imported_lazily():
    # Parsing alone must not need pycocotools or the data loaders.
    assert "refer_data" not in vars(data_sources) and "hub_data" not in vars(data_sources)
