"""The ablation sweep's pieces that do not train: its rows, the overrides it hands to train.py, when it reuses a
finished run, and the arithmetic of its tables."""

import statistics

import pytest

from modeling_sera import SeraConfig
from tests.helpers import load_script


accuracy_ablations = load_script("benchmarks/accuracy_ablations.py")


def test_rows_cover_the_issue_and_quick_keeps_three():
    rows = accuracy_ablations.variants(config_top_k=4, quick=False)
    names = [name for name, _, _ in rows]
    assert names == ["baseline", "adapter", "top1", "top2", "top3", "top4", "no_regularizers", "sentence_router"]
    assert accuracy_ablations.EXTRA_VARIANTS == ("sentence_router",)  # run only when asked for
    labels = dict((name, label) for name, label, _ in rows)
    assert labels["top4"].endswith("(SERA)") and "(SERA)" not in labels["top2"]
    assert [name for name, _, _ in accuracy_ablations.variants(4, quick=True)] == ["baseline", "adapter", "top4"]
    assert [name for name, _, _ in accuracy_ablations.variants(2, quick=True)] == ["baseline", "adapter", "top2"]


@pytest.mark.parametrize("name", ["baseline", "top1", "no_regularizers", "sentence_router"])
def test_overrides_reach_the_config_as_train_py_applies_them(name):
    overrides = dict((row[0], row[2]) for row in accuracy_ablations.variants(4, quick=False))[name]
    config = SeraConfig()
    config.update_from_string(accuracy_ablations.overrides_string(overrides))
    for key, value in overrides.items():
        assert getattr(config, key) == value


def test_a_run_is_reused_only_for_the_same_command_config_and_recipe(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "training_recipe.json").write_text('{"learning_rate": 0.1}')
    command = ["python", "train.py", "--seed", "0"]
    first = accuracy_ablations.run_fingerprint(command, str(tmp_path))
    assert accuracy_ablations.run_fingerprint(["/other/python", *command[1:]], str(tmp_path)) == first
    assert accuracy_ablations.run_fingerprint([*command[:-1], "1"], str(tmp_path)) != first
    (tmp_path / "training_recipe.json").write_text('{"learning_rate": 0.2}')
    assert accuracy_ablations.run_fingerprint(command, str(tmp_path)) != first


def record(name, seed, miou, oiou, attribute):
    scores = {"mIoU": miou, "oIoU": oiou, "per_category": {"attribute": {"mIoU": attribute}}}
    return {"name": name, "seed": seed, "splits": {"test": scores, "test_unseen": scores}}


def test_tables_report_mean_sample_std_and_the_gap_to_the_baseline():
    rows = accuracy_ablations.variants(4, quick=True)
    records = [
        record("baseline", 0, 30.0, 20.0, 40.0),
        record("baseline", 1, 32.0, 22.0, 42.0),
        record("top4", 0, 33.0, 23.0, 45.0),
        record("top4", 1, 35.0, 25.0, 47.0),
        {"name": "adapter", "seed": 0, "error": "train.py exited with 1"},
    ]
    table = accuracy_ablations.tables(rows, records, config_top_k=4)
    std = statistics.stdev([30.0, 32.0])
    baseline_line = next(line for line in table.splitlines() if line.startswith("| baseline"))
    assert f"31.0 ± {std:.1f}" in baseline_line and "21.0 ± 1.4" in baseline_line
    sera_line = next(line for line in table.splitlines() if line.startswith("| + SERA-Adapter + SERA-Fusion, top-4"))
    assert "34.0 ± 1.4" in sera_line and "+3.0" in sera_line
    assert "| + SERA-Adapter | 0 | – |" in table
    assert "- adapter seed 0: train.py exited with 1" in table
    category_line = [line for line in table.splitlines() if line.startswith("| + SERA-Adapter + SERA-Fusion")][-1]
    assert "46.0 ± 1.4" in category_line
