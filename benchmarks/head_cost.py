"""What a training step of the tiny SERA costs with its head resized: FLOPs counted, time as ratios in one run.

    python benchmarks/head_cost.py --output benchmarks/results/head_cost.json

The tiny default config (`hub_configs/sera-synthref-tiny`) inherited DETRIS's head shape: a x4 projector, three
decoder layers and a context expert with MLP ratio 4, on encoders of width 128 and a 16x16 grid. Each variant below
changes only head fields of that config; a training step (forward, backward, Adam, `zero_grad`, in the frozen-encoder
regime of the default run) of each is timed in interleaved rounds in one process, and reported as a ratio against the
committed config, so the figures hold on any CPU. FLOPs are counted on the meta device (forward and backward).
"""

import argparse
from pathlib import Path

import torch
from benchmark_utils import (
    build_model,
    input_sizes,
    interleaved_timing,
    log,
    machine_info,
    make_inputs,
    markdown_table,
    ratio_summary,
    setup_threads,
    write_json,
)
from speed import count_flops


TINY_CONFIG = Path(__file__).resolve().parents[1] / "hub_configs" / "sera-synthref-tiny"
# Every variant names its head fields, so the table does not move when the tiny config does: "committed" is the
# DETRIS-shaped head the tiny config had before 2026-12-02; the tiny config now has "projector x2, 1 decoder layer".
DETRIS_HEAD = {"projector_upsample_factor": 4, "decoder_num_layers": 3, "decoder_dropout": 0.1}
HEAD_VARIANTS = {
    "committed": DETRIS_HEAD,
    "projector x2": {**DETRIS_HEAD, "projector_upsample_factor": 2},
    "projector x1": {**DETRIS_HEAD, "projector_upsample_factor": 1},
    "projector x2, 2 decoder layers": {**DETRIS_HEAD, "projector_upsample_factor": 2, "decoder_num_layers": 2},
    "projector x2, 1 decoder layer": {**DETRIS_HEAD, "projector_upsample_factor": 2, "decoder_num_layers": 1},
    "projector x2, 2 decoder layers, context MLP x2": {
        **DETRIS_HEAD,
        "projector_upsample_factor": 2,
        "decoder_num_layers": 2,
        "fusion_context_mlp_ratio": 2.0,
    },
}


def make_step(overrides: dict, batch_size: int):
    model = build_model(TINY_CONFIG, "sera", **overrides)
    model.train()
    model.freeze_encoders()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = make_inputs(model.config, input_sizes(TINY_CONFIG), batch_size, labels=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16, help="the default run's batch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    setup_threads("cpu", args.threads)

    steps, trainable, flops = {}, {}, {}
    for name, overrides in HEAD_VARIANTS.items():
        steps[name], trainable[name] = make_step(overrides, args.batch_size)
        flops[name] = count_flops(TINY_CONFIG, None, "sera", args.batch_size, backward=True, **overrides)
    seconds = interleaved_timing(steps, repeats=args.repeats, warmup=1, log=log)
    ratios = ratio_summary(seconds, reference="committed")

    rows = []
    for name in HEAD_VARIANTS:
        rows.append(
            [
                name,
                f"{flops[name] / 1e9:.1f}",
                f"{flops[name] / flops['committed']:.2f}",
                f"{ratios[name]['ratio']:.2f}",
                f"{trainable[name] / 1e6:.2f}",
            ]
        )
    table = markdown_table(
        ["head", "GFLOP per step", "FLOPs vs committed", "step time vs committed", "trainable M"], rows
    )
    print(table)
    write_json(
        args.output,
        {
            "machine": machine_info("cpu"),
            "threads": args.threads,
            "batch_size": args.batch_size,
            "variants": HEAD_VARIANTS,
            "flops": flops,
            "trainable_parameters": trainable,
            "seconds": seconds,
            "ratios": ratios,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
