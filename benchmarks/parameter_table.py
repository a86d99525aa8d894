"""Parameter table of a SERA configuration: totals per part, and what trains in the paper's regime.

    python benchmarks/parameter_table.py                      # the paper's real-size model (hub_configs/sera-refcoco)
    python benchmarks/parameter_table.py --config hub_configs/sera-synthref-tiny

The model is built on the meta device, so the real-size table costs no memory and no initialisation time.
"""

import argparse
from pathlib import Path

import torch

from modeling_sera import SeraConfig, SeraForReferringSegmentation


REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS = {
    "vision encoder (backbone)": lambda name: name.startswith("model.vision_model.") and "sera_adapter" not in name,
    "text encoder (backbone)": lambda name: name.startswith("model.text_model."),
    "SERA-Adapters": lambda name: "sera_adapter" in name,
    "SERA-Fusion": lambda name: name.startswith("model.fusion."),
    "neck": lambda name: name.startswith("model.neck.") or name.startswith("model.word_proj."),
    "decoder": lambda name: name.startswith("model.decoder."),
    "projector": lambda name: name.startswith("projector."),
}


def parameter_table(config: SeraConfig) -> list[dict]:
    """One row per part: total and trainable (paper regime) parameter counts. Parts partition the model."""
    with torch.device("meta"):
        model = SeraForReferringSegmentation(config)
    model.freeze_encoders()
    rows = []
    named = list(model.named_parameters())
    for part, belongs in PARTS.items():
        params = [param for name, param in named if belongs(name)]
        rows.append(
            {
                "part": part,
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
        )
    assigned = sum(row["total"] for row in rows)
    everything = sum(p.numel() for _, p in named)
    if assigned != everything:
        raise RuntimeError(f"Parameter parts do not cover the model: {assigned} of {everything} assigned.")
    return rows


def backbone_trainable_share(rows: list[dict]) -> float:
    backbone = [row for row in rows if "(backbone)" in row["part"]]
    return sum(row["trainable"] for row in backbone) / sum(row["total"] for row in backbone)


def format_table(rows: list[dict]) -> str:
    total = sum(row["total"] for row in rows)
    trainable = sum(row["trainable"] for row in rows)
    lines = ["| part | parameters | trainable (paper regime) | share trainable |", "|---|---:|---:|---:|"]
    for row in rows + [{"part": "**total**", "total": total, "trainable": trainable}]:
        share = row["trainable"] / row["total"] if row["total"] else 0.0
        lines.append(f"| {row['part']} | {row['total']:,} | {row['trainable']:,} | {share:.2%} |")
    lines.append("")
    lines.append(f"Backbone parameters trainable (LayerNorm + bias terms): {backbone_trainable_share(rows):.3%}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "hub_configs" / "sera-refcoco"))
    args = parser.parse_args()
    config = SeraConfig.from_pretrained(args.config)
    print(f"SERA parameters for {args.config}\n")
    print(format_table(parameter_table(config)))


if __name__ == "__main__":
    main()
