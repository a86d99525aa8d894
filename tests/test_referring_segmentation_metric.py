"""Tests for the referring segmentation metric (sera_training/metrics/referring_segmentation).

The metric is checked against a plain numpy reference written here from the definitions in section 6 of the design
note, with its own brute-force boundary matching, so that the metric's faster dilation is tested, not repeated.
"""

import importlib.util
import math
from pathlib import Path

import evaluate
import numpy as np
import pytest


METRIC_DIR = Path(__file__).resolve().parents[1] / "sera_training" / "metrics" / "referring_segmentation"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
SCORE_KEYS = ["oIoU", "mIoU"] + [f"Prec@{t}" for t in THRESHOLDS] + ["boundary_F"]


def _load_metric_module():
    path = METRIC_DIR / "referring_segmentation.py"
    spec = importlib.util.spec_from_file_location("referring_segmentation_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


metric_module = _load_metric_module()


@pytest.fixture
def metric(tmp_path):
    return evaluate.load(str(METRIC_DIR), cache_dir=str(tmp_path), keep_in_memory=True)


# ---- plain numpy reference, straight from the definitions ----


def reference_boundary(mask):
    """DAVIS boundary: differs from an in-image right, lower or lower-right neighbour (pixel by pixel)."""
    height, width = mask.shape
    boundary = np.zeros_like(mask, dtype=bool)
    for y in range(height):
        for x in range(width):
            for dy, dx in ((0, 1), (1, 0), (1, 1)):
                if y + dy < height and x + dx < width and mask[y, x] != mask[y + dy, x + dx]:
                    boundary[y, x] = True
    return boundary


def reference_matched(boundary, other_boundary, radius):
    points, others = np.argwhere(boundary), np.argwhere(other_boundary)
    if len(points) == 0 or len(others) == 0:
        return 0
    squared_distances = ((points[:, None, :] - others[None, :, :]) ** 2).sum(-1)
    return int((squared_distances.min(axis=1) <= radius * radius).sum())


def reference_boundary_f(prediction, truth):
    radius = math.ceil(0.008 * math.hypot(*truth.shape))
    predicted, actual = reference_boundary(prediction), reference_boundary(truth)
    n_predicted, n_actual = predicted.sum(), actual.sum()
    if n_predicted == 0 and n_actual == 0:
        return 1.0
    if n_predicted == 0 or n_actual == 0:
        return 0.0
    precision = reference_matched(predicted, actual, radius) / n_predicted
    recall = reference_matched(actual, predicted, radius) / n_actual
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def reference_scores(predictions, references):
    intersections = np.array([(p & g).sum() for p, g in zip(predictions, references)], dtype=float)
    unions = np.array([(p | g).sum() for p, g in zip(predictions, references)], dtype=float)
    ious = np.array([i / u if u > 0 else 1.0 for i, u in zip(intersections, unions)])
    scores = {"oIoU": 100 * intersections.sum() / unions.sum(), "mIoU": 100 * ious.mean()}
    for threshold in THRESHOLDS:
        scores[f"Prec@{threshold}"] = 100 * np.mean(ious >= threshold)
    scores["boundary_F"] = 100 * np.mean([reference_boundary_f(p, g) for p, g in zip(predictions, references)])
    scores["num_samples"] = len(predictions)
    return scores


def random_pairs(seed, count):
    """Blobby random masks of several sizes (thresholded smoothed noise), with some predictions near their truth."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 9), (7, 3), (24, 31), (40, 40), (33, 57)]
    predictions, references = [], []
    for index in range(count):
        height, width = shapes[index % len(shapes)]
        noise = rng.random((height + 4, width + 4))
        smooth = sum(noise[dy : dy + height, dx : dx + width] for dy in range(5) for dx in range(5))
        truth = smooth > np.median(smooth)
        prediction = truth.copy()
        flips = rng.random((height, width)) < rng.uniform(0.0, 0.4)
        prediction[flips] = ~prediction[flips]
        predictions.append(prediction)
        references.append(truth)
    return predictions, references


def assert_scores_close(actual, expected):
    for key in SCORE_KEYS:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key
    assert actual["num_samples"] == expected["num_samples"]


def square(size, top, left, side):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def band(rows, height=100, width=100):
    """A band of full-width rows: its DAVIS boundary is two straight rows, so distances are easy to count by hand."""
    mask = np.zeros((height, width), dtype=bool)
    mask[rows[0] : rows[1]] = True
    return mask


# ---- agreement with the reference ----


def test_matches_numpy_reference_on_random_masks(metric):
    predictions, references = random_pairs(seed=0, count=20)
    results = metric.compute(predictions=predictions, references=references)
    assert_scores_close(results, reference_scores(predictions, references))
    assert "per_category" not in results


def test_streaming_many_batches_equals_all_at_once(tmp_path):
    predictions, references = random_pairs(seed=1, count=23)
    categories = ["attribute", "location", "relation"] * 7 + ["attribute", "location"]

    # Default mode: the cache is an Arrow file on disk, filled batch by batch.
    streamed = evaluate.load(str(METRIC_DIR), cache_dir=str(tmp_path / "streamed"))
    for start in range(0, 23, 4):
        streamed.add_batch(
            predictions=predictions[start : start + 4],
            references=references[start : start + 4],
            categories=categories[start : start + 4],
        )
    streamed.add(prediction=predictions[0], reference=references[0], categories="comparison")
    streamed_results = streamed.compute()

    at_once = evaluate.load(str(METRIC_DIR), cache_dir=str(tmp_path / "at_once"))
    at_once_results = at_once.compute(
        predictions=predictions + predictions[:1],
        references=references + references[:1],
        categories=categories + ["comparison"],
    )
    assert streamed_results == at_once_results
    assert_scores_close(streamed_results, reference_scores(predictions + predictions[:1], references + references[:1]))


def test_accepts_torch_tensors_and_0_255_masks(metric):
    torch = pytest.importorskip("torch")
    predictions, references = random_pairs(seed=2, count=5)
    results = metric.compute(
        predictions=[torch.from_numpy(p) for p in predictions],
        references=[g.astype(np.uint8) * 255 for g in references],
    )
    assert_scores_close(results, reference_scores(predictions, references))


def test_per_category_scores_are_scores_of_each_subset(metric):
    predictions, references = random_pairs(seed=3, count=12)
    categories = ["attribute", "relation", ""] * 4
    results = metric.compute(predictions=predictions, references=references, categories=categories)

    assert_scores_close(results, reference_scores(predictions, references))
    # "" means "no category": those samples count overall but get no entry of their own.
    assert sorted(results["per_category"]) == ["attribute", "relation"]
    for category in ("attribute", "relation"):
        members = [i for i, c in enumerate(categories) if c == category]
        expected = reference_scores([predictions[i] for i in members], [references[i] for i in members])
        assert_scores_close(results["per_category"][category], expected)


# ---- hand-checked values and edge cases ----


def test_oiou_and_miou_differ_as_defined(metric):
    small_hit = np.zeros((3, 3), dtype=bool)
    small_hit[0, 0] = True
    big_miss_prediction = np.zeros((3, 3), dtype=bool)
    big_miss_truth = np.ones((3, 3), dtype=bool)
    results = metric.compute(predictions=[small_hit, big_miss_prediction], references=[small_hit, big_miss_truth])
    assert results["oIoU"] == pytest.approx(100 * 1 / 10)  # (1 + 0) / (1 + 9)
    assert results["mIoU"] == pytest.approx(100 * (1.0 + 0.0) / 2)
    assert results["Prec@0.9"] == pytest.approx(50.0)


def test_precision_thresholds_are_inclusive(metric):
    truth = np.zeros((1, 10), dtype=bool)
    truth[0, :10] = True
    prediction = np.zeros((1, 10), dtype=bool)
    prediction[0, :7] = True  # IoU exactly 7 / 10
    results = metric.compute(predictions=[prediction], references=[truth])
    assert [results[f"Prec@{t}"] for t in THRESHOLDS] == [100.0, 100.0, 100.0, 0.0, 0.0]


def test_perfect_prediction(metric):
    truth = square(50, 10, 12, 20)
    results = metric.compute(predictions=[truth.copy()], references=[truth])
    assert all(results[key] == 100.0 for key in SCORE_KEYS)


def test_empty_prediction_scores_zero(metric):
    truth = square(50, 10, 12, 20)
    results = metric.compute(predictions=[np.zeros_like(truth)], references=[truth])
    assert all(results[key] == 0.0 for key in SCORE_KEYS)


def test_empty_reference_scores_zero(metric):
    prediction = square(50, 10, 12, 20)
    results = metric.compute(predictions=[prediction], references=[np.zeros_like(prediction)])
    assert all(results[key] == 0.0 for key in SCORE_KEYS)


def test_both_empty_is_a_perfect_sample(metric):
    empty = np.zeros((30, 20), dtype=bool)
    results = metric.compute(predictions=[empty], references=[empty.copy()])
    assert all(results[key] == 100.0 for key in SCORE_KEYS)


def test_shape_mismatch_is_a_clear_error(metric):
    expected = r"predictions\[1\] has shape \(4, 5\) but references\[1\] has shape \(5, 4\)"
    with pytest.raises(ValueError, match=expected):
        metric.add_batch(
            predictions=[np.zeros((2, 2)), np.zeros((4, 5))], references=[np.zeros((2, 2)), np.zeros((5, 4))]
        )
    with pytest.raises(ValueError, match="2D mask"):
        metric.add_batch(predictions=[np.zeros((1, 4, 5))], references=[np.zeros((1, 4, 5))])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.add_batch(predictions=[np.zeros((2, 2))] * 2, references=[np.zeros((2, 2))])
    with pytest.raises(ValueError, match="categories"):
        metric.add_batch(predictions=[np.zeros((2, 2))], references=[np.zeros((2, 2))], categories=["a", "b"])


def test_boundary_tolerance_is_ceil_of_0_008_diagonal():
    assert metric_module.boundary_tolerance(480, 640) == 7  # 0.008 * 800 = 6.4
    assert metric_module.boundary_tolerance(100, 100) == 2  # 0.008 * 141.4 = 1.13
    assert metric_module.boundary_tolerance(3, 4) == 1


def test_boundary_f_of_bands_by_hand(metric):
    # 100 x 100 image: tolerance 2 px. The band of rows [40, 60) has boundary rows 39 and 59, 100 pixels each.
    truth = band((40, 60))
    within = metric.compute(predictions=[band((42, 62))], references=[truth])  # both lines moved by 2 <= 2
    assert within["boundary_F"] == pytest.approx(100.0)
    beyond = metric.compute(predictions=[band((43, 63))], references=[truth])  # both lines moved by 3 > 2
    assert beyond["boundary_F"] == pytest.approx(0.0)
    assert beyond["mIoU"] == pytest.approx(100 * 17 / 23)
    # Top line moved by 1 (matched), bottom line by 4 (not): precision = recall = 100 / 200, F = 0.5.
    half = metric.compute(predictions=[band((41, 64))], references=[truth])
    assert half["boundary_F"] == pytest.approx(50.0)


def test_boundary_f_of_shifted_square(metric):
    truth = square(100, 30, 30, 25)  # tolerance 2 px
    within = metric.compute(predictions=[square(100, 32, 30, 25)], references=[truth])  # moved 2 px down
    assert within["boundary_F"] == pytest.approx(100.0)
    assert within["mIoU"] < 100.0
    beyond_prediction = square(100, 30, 34, 25)  # moved 4 px right: the left and right sides no longer match
    beyond = metric.compute(predictions=[beyond_prediction], references=[truth])
    assert beyond["boundary_F"] < 80.0
    assert beyond["boundary_F"] == pytest.approx(100 * reference_boundary_f(beyond_prediction, truth))


def test_boundary_map_follows_davis():
    mask = np.zeros((5, 6), dtype=bool)
    mask[1:3, 2:4] = True
    np.testing.assert_array_equal(metric_module.boundary_map(mask), reference_boundary(mask))
    # Image borders are not boundaries: a full mask has none, so its F against itself is the both-empty case.
    assert not metric_module.boundary_map(np.ones((4, 4), dtype=bool)).any()


@pytest.mark.parametrize("radius", [0, 1, 2, 5])
def test_disk_dilation_matches_brute_force(radius):
    rng = np.random.default_rng(radius)
    mask = rng.random((17, 23)) < 0.05
    span = range(-radius, radius + 1)
    offsets = [(dy, dx) for dy in span for dx in span if dy * dy + dx * dx <= radius * radius]
    expected = np.zeros_like(mask)
    for y, x in np.argwhere(mask):
        for dy, dx in offsets:
            if 0 <= y + dy < 17 and 0 <= x + dx < 23:
                expected[y + dy, x + dx] = True
    np.testing.assert_array_equal(metric_module.dilate_with_disk(mask, radius), expected)


def test_cache_holds_counts_not_masks(metric):
    full_resolution = square(480, 100, 100, 200)[:, :460]
    metric.add_batch(predictions=[full_resolution, full_resolution], references=[full_resolution, full_resolution])
    # Whatever evaluate writes to its cache (memory here, an Arrow file by default) is eight integers and a string.
    schema = metric.writer.schema
    assert schema.names == ["predictions", "references", "categories"]
    for side in ("predictions", "references"):
        assert {str(field.type) for field in schema.field(side).type} == {"int64"}
    assert str(schema.field("categories").type) == "string"
    assert len(metric) == 2
