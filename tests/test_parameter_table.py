"""benchmarks/parameter_table.py: the real-size model's table, and the paper's "<1% of backbone parameters"."""

import subprocess
import sys

from modeling_sera import SeraConfig
from tests.helpers import REPO_ROOT, load_script


backbone_trainable_share = load_script("benchmarks/parameter_table.py").backbone_trainable_share
parameter_table = load_script("benchmarks/parameter_table.py").parameter_table


def test_real_size_backbone_share_trainable_is_under_one_percent():
    rows = parameter_table(SeraConfig.from_pretrained(REPO_ROOT / "hub_configs" / "sera-refcoco"))
    by_part = {row["part"]: row for row in rows}
    assert by_part["vision encoder (backbone)"]["total"] > 80_000_000  # DINOv2-B
    assert by_part["text encoder (backbone)"]["total"] > 60_000_000  # CLIP-B text
    for part in ("SERA-Adapters", "SERA-Fusion", "neck", "decoder", "projector"):
        assert by_part[part]["trainable"] == by_part[part]["total"] > 0
    share = backbone_trainable_share(rows)
    assert 0 < share < 0.01


def test_baseline_config_has_no_sera_parameters():
    rows = parameter_table(SeraConfig(use_sera_adapter=False, use_sera_fusion=False))
    by_part = {row["part"]: row for row in rows}
    assert by_part["SERA-Adapters"]["total"] == 0 and by_part["SERA-Fusion"]["total"] == 0


def test_script_prints_the_table():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "parameter_table.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "| SERA-Fusion |" in result.stdout
    assert "Backbone parameters trainable" in result.stdout
