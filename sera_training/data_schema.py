"""The one example schema every data source produces, so training and evaluation never care where data came from.

One row per referring expression. ``mask`` is a single-channel PNG (mode "L") at the image's original size, with
0 for background and 255 for the referred object; readers binarize with ``> 0``.
"""

from collections import Counter

import datasets


EXAMPLE_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "expression": datasets.Value("string"),
        # "attribute" / "location" / "relation" / "comparison" for the synthetic data; "" where a source has none.
        "category": datasets.Value("string"),
        "image_id": datasets.Value("int64"),
        "object_id": datasets.Value("int64"),  # COCO ann_id for RefCOCO-family data
        "ref_id": datasets.Value("int64"),
        "sentence_id": datasets.Value("int64"),
        "source": datasets.Value("string"),  # e.g. "synthref", "refcoco(unc)", "jxu124/refcoco"
    }
)


class SkippedRecords:
    """Counts records a loader had to skip, by reason, so that nothing is dropped silently."""

    def __init__(self, source: str):
        self.source = source
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return f"{self.source}: no records skipped"
        parts = [f"{count} x {reason} (e.g. {self.examples[reason]})" for reason, count in self.counts.most_common()]
        return f"{self.source}: skipped {self.total} records: " + "; ".join(parts)

    def raise_if_nothing_left(self, kept: int) -> None:
        if kept == 0:
            raise ValueError(
                f"{self.source}: no usable records were found. {self.summary()}. "
                "Check that the annotation files and the image folder belong together."
            )
