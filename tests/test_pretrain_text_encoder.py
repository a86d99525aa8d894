"""The text-tower pretraining of #12: its data says what it claims, and a short run writes a loadable tower."""

import json

import numpy as np
import pytest
from transformers import CLIPTextModelWithProjection

from sera_training.pretrain_text_encoder import (
    MEANING_FIELDS,
    hard_negative,
    meaning_labels,
    pretrain_text_encoder,
    random_expression,
)
from sera_training.synthetic_expressions import parse_expression, verbalize
from sera_training.synthetic_scenes import HELD_OUT_COMBINATIONS
from tests.helpers import REPO_ROOT


def _named_pairs(expression):
    descriptions = [expression.target] + ([expression.anchor] if expression.anchor is not None else [])
    return {(d.color, d.shape) for d in descriptions}


def test_random_meanings_are_worded_parsed_back_and_avoid_held_out_pairs():
    rng = np.random.default_rng(0)
    for _ in range(500):
        expression = random_expression(rng)
        assert not _named_pairs(expression) & HELD_OUT_COMBINATIONS
        assert parse_expression(verbalize(expression, rng)) == expression


def test_a_hard_negative_differs_in_exactly_one_field():
    rng = np.random.default_rng(1)
    for _ in range(500):
        expression = random_expression(rng)
        twin = hard_negative(expression, rng)
        differing = [a != b for a, b in zip(meaning_labels(expression), meaning_labels(twin))]
        assert sum(differing) == 1, (expression, twin)
        assert not _named_pairs(twin) & HELD_OUT_COMBINATIONS
        assert len(meaning_labels(twin)) == len(MEANING_FIELDS)


@pytest.mark.timeout(300)
def test_a_short_run_writes_a_loadable_tower_and_its_report(tmp_path):
    report = pretrain_text_encoder(
        output=tmp_path,
        config_path=REPO_ROOT / "hub_configs" / "sera-synthref-tiny",
        max_steps=3,
        batch_size=8,
        log=lambda message: None,
    )
    assert CLIPTextModelWithProjection.from_pretrained(tmp_path / "text_encoder").config.vocab_size > 0
    saved = json.loads((tmp_path / "text_pretraining_report.json").read_text())
    assert saved["settings"]["max_steps"] == 3
    assert set(saved["held_out_evaluation"]["field_accuracy"]) == set(MEANING_FIELDS)
    assert report["final_losses_mean_of_last_50_steps"]["loss"] > 0
