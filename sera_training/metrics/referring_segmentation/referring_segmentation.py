"""Referring image segmentation metric: oIoU, mIoU, Prec@X and the DAVIS boundary F-measure.

Load it with ``evaluate.load("sera_training/metrics/referring_segmentation")`` (or its installed folder,
``sera_training.evaluation.METRIC_PATH``). The definitions follow section 6 of the SERA
design note; the README.md next to this file is the metric card.

Masks are reduced to a handful of integer counts per sample as soon as they are added, so evaluate's cache (an Arrow
file, or memory) holds a few bytes per sample instead of a full-resolution mask, and streaming, all-at-once and
distributed evaluation all give bit-identical results.
"""

import math

import datasets
import evaluate
import numpy as np


_CITATION = """\
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg, Alexander C. and Berg, Tamara L.},
  booktitle={ECCV},
  year={2016}
}
@inproceedings{perazzi2016benchmark,
  title={A Benchmark Dataset and Evaluation Methodology for Video Object Segmentation},
  author={Perazzi, Federico and Pont-Tuset, Jordi and McWilliams, Brian and Van Gool, Luc and Gross, Markus
          and Sorkine-Hornung, Alexander},
  booktitle={CVPR},
  year={2016}
}
"""

_DESCRIPTION = """\
Referring image segmentation scores, computed on binary masks at the original image resolution. For sample i with
predicted mask P_i and reference mask G_i, I_i = |P_i and G_i| and U_i = |P_i or G_i|.

- oIoU (also called cIoU) = sum_i I_i / sum_i U_i
- mIoU (also called gIoU) = mean_i I_i / U_i, where a sample with U_i = 0 (both masks empty) has IoU 1
- Prec@X for X in {0.5, 0.6, 0.7, 0.8, 0.9} = share of samples with IoU_i >= X
- boundary_F = mean over samples of the DAVIS boundary F-measure, tolerance ceil(0.008 * image diagonal) pixels

All scores are percentages in [0, 100], as in the papers.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2D arrays): predicted binary masks, one per sample, at the original image resolution.
        Any array-like works (numpy, torch on CPU, PIL "L"/"1" images, nested lists); non-zero means foreground.
    references (`list` of 2D arrays): reference binary masks, each with the shape of its prediction.
    categories (`list` of `str`, *optional*): a category per sample (e.g. "attribute", "relation"). When given,
        every score is also reported per category. The empty string means "no category".
        With `add()`, pass a single string.

Returns:
    `dict` with
        oIoU (`float`): overall IoU, sum of intersections / sum of unions, in %.
        mIoU (`float`): mean of the per-sample IoUs, in %.
        Prec@0.5 ... Prec@0.9 (`float`): share of samples with IoU >= 0.5 ... 0.9, in %.
        boundary_F (`float`): mean per-sample DAVIS boundary F-measure, in %.
        num_samples (`int`): number of scored samples.
        per_category (`dict`, only when some category is non-empty): category -> a dict with the keys above.

Examples:
    >>> import numpy as np
    >>> metric = evaluate.load("sera_training/metrics/referring_segmentation")
    >>> prediction = np.zeros((4, 4), dtype=bool); prediction[:2, :2] = True
    >>> reference = np.zeros((4, 4), dtype=bool); reference[:2, :] = True
    >>> metric.compute(predictions=[prediction], references=[reference])["mIoU"]
    50.0
"""

IOU_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
BOUNDARY_TOLERANCE_FRACTION = 0.008  # of the image diagonal, as in DAVIS

# What one side of a pair contributes to the cache: its area, how much of it lies in the other mask, its boundary
# length and how much of that boundary lies within tolerance of the other boundary.
_SIDE_COUNTS = {
    "area": datasets.Value("int64"),
    "area_matched": datasets.Value("int64"),
    "boundary": datasets.Value("int64"),
    "boundary_matched": datasets.Value("int64"),
}


def boundary_tolerance(height: int, width: int) -> int:
    """Boundary match tolerance in pixels: ceil(0.008 * image diagonal)."""
    return math.ceil(BOUNDARY_TOLERANCE_FRACTION * math.sqrt(height * height + width * width))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask, as DAVIS defines it.

    A pixel is on the boundary when it differs from any of its right, lower and lower-right neighbours that lie inside
    the image. The boundary thus sits half a pixel towards the origin from the true contour, and image borders are not
    boundaries: a mask covering the whole image has none.
    """
    boundary = np.zeros(mask.shape, dtype=bool)
    boundary[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    boundary[:-1, :] |= mask[:-1, :] != mask[1:, :]
    boundary[:-1, :-1] |= mask[:-1, :-1] != mask[1:, 1:]
    return boundary


def dilate_with_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by the disk {(dx, dy): dx^2 + dy^2 <= radius^2}; pixels outside the image count as background.

    The disk is a stack of horizontal segments, so this costs one horizontal running window per distinct segment
    width plus 2 * radius + 1 shifted ORs, instead of one shift per disk pixel. No scipy needed.
    """
    height, width = mask.shape
    padded = np.zeros((height, width + 2 * radius + 1), dtype=np.int32)
    padded[:, radius + 1 : radius + 1 + width] = mask
    prefix_sums = np.cumsum(padded, axis=1)

    rows_by_half_width = {}
    dilated = np.zeros(mask.shape, dtype=bool)
    for dy in range(-radius, radius + 1):
        half_width = math.isqrt(radius * radius - dy * dy)
        if half_width not in rows_by_half_width:
            # Any foreground in columns [x - half_width, x + half_width] of the same row.
            window_end = prefix_sums[:, radius + 1 + half_width : radius + 1 + half_width + width]
            window_start = prefix_sums[:, radius - half_width : radius - half_width + width]
            rows_by_half_width[half_width] = window_end > window_start
        rows = rows_by_half_width[half_width]
        # Pixel (y, x) is reached from a foreground pixel in row y + dy.
        if dy >= 0:
            dilated[: height - dy] |= rows[dy:]
        else:
            dilated[-dy:] |= rows[: height + dy]
    return dilated


def _count_matched_boundary(boundary: np.ndarray, other_boundary: np.ndarray, radius: int) -> int:
    """Number of pixels of `boundary` with a pixel of `other_boundary` within `radius` (Euclidean)."""
    if not boundary.any() or not other_boundary.any():
        return 0
    # Matches can only happen inside the bounding box of both boundaries, which is usually a small part of the image.
    rows = np.flatnonzero((boundary | other_boundary).any(axis=1))
    columns = np.flatnonzero((boundary | other_boundary).any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
    return int((boundary[window] & dilate_with_disk(other_boundary[window], radius)).sum())


def _as_binary_mask(mask, name: str, index: int) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{name}[{index}] must be a 2D mask (height, width), got shape {array.shape}.")
    return array > 0 if array.dtype != bool else array


def mask_pair_counts(prediction, reference, index: int = 0) -> tuple[dict, dict]:
    """Reduce a (prediction, reference) pair to the integer counts the metric caches, one dict per side."""
    prediction = _as_binary_mask(prediction, "predictions", index)
    reference = _as_binary_mask(reference, "references", index)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"predictions[{index}] has shape {prediction.shape} but references[{index}] has shape {reference.shape}. "
            "Score masks at the original image resolution: resize the prediction to its reference's size first."
        )
    intersection = int(np.count_nonzero(prediction & reference))
    radius = boundary_tolerance(*reference.shape)
    prediction_boundary = boundary_map(prediction)
    reference_boundary = boundary_map(reference)
    prediction_counts = {
        "area": int(np.count_nonzero(prediction)),
        "area_matched": intersection,
        "boundary": int(np.count_nonzero(prediction_boundary)),
        "boundary_matched": _count_matched_boundary(prediction_boundary, reference_boundary, radius),
    }
    reference_counts = {
        "area": int(np.count_nonzero(reference)),
        "area_matched": intersection,
        "boundary": int(np.count_nonzero(reference_boundary)),
        "boundary_matched": _count_matched_boundary(reference_boundary, prediction_boundary, radius),
    }
    return prediction_counts, reference_counts


def boundary_f_measure(
    prediction_boundary: np.ndarray,
    prediction_matched: np.ndarray,
    reference_boundary: np.ndarray,
    reference_matched: np.ndarray,
) -> np.ndarray:
    """Per-sample DAVIS boundary F from boundary pixel counts (vectorized over samples).

    Precision = matched / predicted boundary pixels, recall = matched / reference boundary pixels, and an empty
    boundary gives 1 for its own ratio, as in DAVIS. Hence: both boundaries empty -> F = 1; exactly one empty -> the
    other ratio is 0 (nothing can match an empty boundary) -> F = 0.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(prediction_boundary > 0, prediction_matched / prediction_boundary, 1.0)
        recall = np.where(reference_boundary > 0, reference_matched / reference_boundary, 1.0)
        f_measure = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return f_measure


def summarize(intersections: np.ndarray, unions: np.ndarray, boundary_f: np.ndarray) -> dict:
    """The scores of one group of samples, in percent."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ious = np.where(unions > 0, intersections / unions, 1.0)  # both masks empty: a perfect prediction
    total_union = int(unions.sum())
    overall_iou = int(intersections.sum()) / total_union if total_union > 0 else 1.0
    scores = {"oIoU": 100.0 * overall_iou, "mIoU": 100.0 * float(ious.mean())}
    for threshold in IOU_THRESHOLDS:
        scores[f"Prec@{threshold}"] = 100.0 * float((ious >= threshold).mean())
    scores["boundary_F"] = 100.0 * float(boundary_f.mean())
    scores["num_samples"] = int(len(ious))
    return scores


def _check_categories(categories, num_samples: int) -> list:
    if categories is None:
        return [""] * num_samples
    if isinstance(categories, str):
        raise ValueError("`categories` must be a list with one string per sample, not a single string.")
    categories = list(categories)
    if len(categories) != num_samples:
        raise ValueError(f"Got {len(categories)} categories for {num_samples} samples.")
    if not all(isinstance(category, str) for category in categories):
        raise ValueError("Every category must be a string (use '' for none).")
    return categories


def scores_from_counts(predictions: list, references: list, categories: list) -> dict:
    """The scores from the per-sample counts of :func:`mask_pair_counts` (one dict per side and sample) and a
    category per sample ("" for none): what the metric computes, for callers that gather counts themselves."""
    if len(predictions) == 0:
        raise ValueError("No samples were added: call add_batch(predictions=..., references=...) first.")
    intersections = np.array([counts["area_matched"] for counts in predictions], dtype=np.int64)
    predicted_areas = np.array([counts["area"] for counts in predictions], dtype=np.int64)
    reference_areas = np.array([counts["area"] for counts in references], dtype=np.int64)
    unions = predicted_areas + reference_areas - intersections
    boundary_f = boundary_f_measure(
        np.array([counts["boundary"] for counts in predictions], dtype=np.float64),
        np.array([counts["boundary_matched"] for counts in predictions], dtype=np.float64),
        np.array([counts["boundary"] for counts in references], dtype=np.float64),
        np.array([counts["boundary_matched"] for counts in references], dtype=np.float64),
    )

    results = summarize(intersections, unions, boundary_f)
    categories = np.asarray(categories, dtype=object)
    named_categories = sorted(set(categories) - {""})
    if named_categories:
        results["per_category"] = {}
        for category in named_categories:
            members = categories == category
            results["per_category"][category] = summarize(intersections[members], unions[members], boundary_f[members])
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ReferringSegmentation(evaluate.Metric):
    """oIoU, mIoU, Prec@X and boundary F for referring image segmentation, optionally per category."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # What is cached per sample: counts, not masks (see `add_batch`).
            features=datasets.Features(
                {
                    "predictions": dict(_SIDE_COUNTS),
                    "references": dict(_SIDE_COUNTS),
                    "categories": datasets.Value("string"),
                }
            ),
            reference_urls=[
                "https://github.com/lichengunc/refer",
                "https://github.com/davisvideochallenge/davis2017-evaluation",
            ],
        )

    def add_batch(self, *, predictions=None, references=None, categories=None):
        """Add a batch of predicted and reference masks; only their per-sample counts are kept."""
        if predictions is None or references is None:
            raise ValueError("add_batch needs both `predictions` and `references`.")
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions but {len(references)} references.")
        categories = _check_categories(categories, len(predictions))
        counts = [mask_pair_counts(p, r, index) for index, (p, r) in enumerate(zip(predictions, references))]
        super().add_batch(
            predictions=[prediction_counts for prediction_counts, _ in counts],
            references=[reference_counts for _, reference_counts in counts],
            categories=categories,
        )

    def add(self, *, prediction=None, reference=None, categories=None):
        """Add one predicted and one reference mask (and optionally its category, a string)."""
        self.add_batch(
            predictions=[prediction], references=[reference], categories=None if categories is None else [categories]
        )

    def compute(self, *, predictions=None, references=None, categories=None, **kwargs):
        """Score everything added so far, plus the masks passed here, if any."""
        # The base class insists on every cached column, `categories` included, whenever inputs are passed here.
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references, categories=categories)
        return super().compute(**kwargs)

    def _compute(self, predictions, references, categories):
        return scores_from_counts(predictions, references, categories)
