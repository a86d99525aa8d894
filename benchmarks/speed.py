"""Forward latency and throughput of SERA against the baseline and against the frozen encoders alone.

    python benchmarks/speed.py                                  # real size; GPU: bf16, batches 1 and 16
    python benchmarks/speed.py --batch-sizes 1 4 --repeats 5    # what BENCHMARKS.md reports on CPU

Variants (random weights: they time like trained ones):

- `encoders`: the DINOv2 vision tower and CLIP text tower alone, called as SERA calls them;
- `baseline`: the whole model without SERA modules (`use_sera_adapter=False, use_sera_fusion=False`);
- `adapter`: + SERA-Adapter only (with `--variants ... adapter`);
- `sera`: SERA (Adapter + Fusion, top-4), the default configuration.

All variants live in one process and are timed in interleaved rounds; each figure is the median over rounds of its
ratio to the same round's baseline (or encoders). FLOPs per image (FlopCounterMode, on the meta device) sit next to
the time ratios: where they agree, the cost is arithmetic the design asks for, not overhead.
"""

import argparse

import torch
from benchmark_utils import (
    VARIANT_NAMES,
    add_common_arguments,
    build_model,
    encoders_forward,
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
from torch.utils.flop_counter import FlopCounterMode


def count_flops(
    config_path, image_size, variant: str, batch_size: int = 1, backward: bool = False, **overrides
) -> int:
    """FLOPs of one forward (and backward, in the PEFT regime) of a variant, counted on the meta device; `overrides`
    change config fields."""
    model_variant = "baseline" if variant == "encoders" else variant
    model = build_model(config_path, model_variant, device="meta", **overrides)
    inputs = make_inputs(
        model.config, input_sizes(config_path, image_size), batch_size, device="meta", labels=backward
    )
    # No attention_mask on meta: the text tower reads the mask's values to pick a fast path. The mask changes no FLOP
    # count (attention runs over the padded length either way).
    inputs.pop("attention_mask")
    counter = FlopCounterMode(display=False)
    if backward:
        model.train()
        model.freeze_encoders()
        with counter:
            model(**inputs).loss.backward()
        return counter.get_total_flops()
    model.eval()
    with counter, torch.no_grad():
        if variant == "encoders":
            inputs["attention_mask"] = None
            encoders_forward(model, inputs)
        else:
            model(**inputs)
    return counter.get_total_flops()


# Configuration changes that would cut SERA's cost, counted (not timed) to show what the speed targets would take.
ALTERNATIVES = {
    "SERA as configured": {},
    "SERA-Fusion on the last level only (fusion_levels=[2])": {"fusion_levels": [2]},
    "context expert MLP ratio 2 (fusion_context_mlp_ratio=2.0)": {"fusion_context_mlp_ratio": 2.0},
    "decoder FFN 512 like DETRIS-B (decoder_intermediate_size=512)": {"decoder_intermediate_size": 512},
}


def alternatives_flops(config_path, image_size) -> dict[str, dict]:
    """FLOPs per image of SERA and of the baseline under each alternative, and their ratios (meta device)."""
    encoders = count_flops(config_path, image_size, "encoders")
    rows = {}
    for name, overrides in ALTERNATIVES.items():
        flops = {}
        for variant in ("baseline", "sera"):
            model = build_model(config_path, variant, device="meta", **overrides).eval()
            inputs = make_inputs(model.config, input_sizes(config_path, image_size), 1, device="meta")
            inputs.pop("attention_mask")
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                model(**inputs)
            flops[variant] = counter.get_total_flops()
        rows[name] = {
            "sera_gflop": flops["sera"] / 1e9,
            "sera_over_baseline": flops["sera"] / flops["baseline"],
            "sera_over_encoders": flops["sera"] / encoders,
            "baseline_over_encoders": flops["baseline"] / encoders,
        }
    return rows


def run(args) -> dict:
    setup_threads(args.device, args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    models = {}
    for variant in args.variants:
        if variant == "encoders":
            continue
        log(f"speed: building {variant}")
        models[variant] = build_model(args.config, variant, args.device, dtype).eval()
    config = models["baseline"].config
    sizes = input_sizes(args.config, args.image_size)

    results = {
        "machine": machine_info(args.device),
        "config": args.config,
        "image_size": sizes[0],
        "dtype": str(dtype),
        "variants": args.variants,
        "batches": {},
    }
    flops = {variant: count_flops(args.config, args.image_size, variant) for variant in args.variants}
    results["gflop_per_image"] = {variant: value / 1e9 for variant, value in flops.items()}
    results["alternatives"] = alternatives_flops(args.config, args.image_size)

    repeats = args.repeats * len(args.batch_sizes) if len(args.repeats) == 1 else args.repeats
    for batch_size, rounds in zip(args.batch_sizes, repeats):
        inputs = make_inputs(config, sizes, batch_size, device=args.device)
        functions = {}
        for variant in args.variants:
            if variant == "encoders":
                functions[variant] = lambda inputs=inputs: encoders_forward(models["baseline"], inputs)
            else:
                functions[variant] = lambda model=models[variant], inputs=inputs: model(**inputs)
        log(f"speed: batch {batch_size}, {rounds} interleaved rounds")
        with torch.inference_mode():
            seconds = interleaved_timing(functions, rounds, args.warmup, args.device, log=log)
        versus_baseline = ratio_summary(seconds, "baseline")
        versus_encoders = ratio_summary(seconds, "encoders") if "encoders" in seconds else None
        rows = {}
        for variant in args.variants:
            entry = versus_baseline[variant]
            rows[variant] = {
                "latency_ms": 1e3 * entry["median_s"],
                "images_per_s": batch_size / entry["median_s"],
                "ratio_to_baseline": entry["ratio"],
                "ratio_to_baseline_range": [entry["ratio_min"], entry["ratio_max"]],
                "ratio_to_encoders": versus_encoders[variant]["ratio"] if versus_encoders else None,
                "seconds": seconds[variant],
            }
        results["batches"][str(batch_size)] = rows
    return results


def format_results(results: dict) -> str:
    flops = results["gflop_per_image"]
    header = [
        "batch",
        "variant",
        "latency ms",
        "images/s",
        "time vs encoders",
        "time vs baseline (min-max)",
        "GFLOP/image",
        "FLOPs vs baseline",
    ]
    rows = []
    for batch_size, entries in results["batches"].items():
        for variant, entry in entries.items():
            low, high = entry["ratio_to_baseline_range"]
            rows.append(
                [
                    batch_size,
                    VARIANT_NAMES[variant],
                    f"{entry['latency_ms']:.0f}",
                    f"{entry['images_per_s']:.2f}",
                    f"{entry['ratio_to_encoders']:.2f}x" if entry["ratio_to_encoders"] is not None else "",
                    f"{entry['ratio_to_baseline']:.3f}x ({low:.2f}-{high:.2f})",
                    f"{flops[variant]:.1f}",
                    f"{flops[variant] / flops['baseline']:.3f}x",
                ]
            )
    text = markdown_table(header, rows, align="rlrrrrrr")
    if results.get("alternatives"):
        text += "\n\nFLOPs per image of configuration alternatives (counted, not timed):\n\n" + markdown_table(
            ["configuration", "SERA GFLOP", "SERA / baseline", "SERA / encoders", "baseline / encoders"],
            [
                [
                    name,
                    f"{row['sera_gflop']:.1f}",
                    f"{row['sera_over_baseline']:.3f}",
                    f"{row['sera_over_encoders']:.3f}",
                    f"{row['baseline_over_encoders']:.3f}",
                ]
                for name, row in results["alternatives"].items()
            ],
        )
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="Default: 1 16 on GPU, 1 4 on CPU.")
    parser.add_argument(
        "--repeats", type=int, nargs="+", default=[5], help="Interleaved rounds: one value, or one per batch size."
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["encoders", "baseline", "sera"], choices=list(VARIANT_NAMES))
    args = parser.parse_args()
    if "baseline" not in args.variants:
        parser.error("--variants must include baseline, the reference of every ratio.")
    if args.batch_sizes is None:
        args.batch_sizes = [1, 16] if args.device.startswith("cuda") else [1, 4]
    if len(args.repeats) not in (1, len(args.batch_sizes)):
        parser.error("--repeats takes one value, or one per batch size.")
    results = run(args)
    write_json(args.output, results)
    print(format_results(results))


if __name__ == "__main__":
    main()
