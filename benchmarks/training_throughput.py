"""Training throughput of SERA in the paper's regime, its model-FLOP utilisation, and the 65-epoch recipe in hours.

    python benchmarks/training_throughput.py                 # GPU: bf16 autocast, batch 16; CPU: fp32, batch 2
    python benchmarks/training_throughput.py --batch-size 4

A training step is forward, backward, Adam step and `zero_grad`, in the PEFT regime (`freeze_encoders()`), for SERA
and for the baseline (no SERA modules, same regime), timed in interleaved rounds in one process.

Model FLOPs per image are those of one forward and backward in that regime, counted by
`torch.utils.flop_counter.FlopCounterMode` on the meta device (no recomputation counted: that is the MFU convention).
Utilisation is achieved FLOP/s over a peak: on a GPU, the card's dense bf16 peak given with `--peak-tflops`; on a CPU,
the fp32 matrix-multiply rate this machine reaches in the same process (a 2048^3 GEMM, timed in the same rounds), so
the figure reads "share of what this CPU can do on the model's main operation".

The recipe estimate multiplies the FLOPs per image by the samples the paper's recipe sees: 65 epochs (DETRIS
milestones 35 and 55) over RefCOCO (UNC) train, whose DETRIS/CRIS loader yields one sample per referred object
(42,404, a random one of its expressions each time; 120,624 expressions in all). On a CPU the GPU hours are an
estimate at an assumed utilisation, and say so.
"""

import argparse

import torch
from benchmark_utils import (
    add_common_arguments,
    autocast_context,
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


REFCOCO_TRAIN_OBJECTS = 42_404  # referred objects in RefCOCO (UNC) train: one sample each per epoch in DETRIS
REFCOCO_TRAIN_EXPRESSIONS = 120_624
RECIPE_EPOCHS = 65
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, for the labelled estimates.
GPU_PEAKS_TFLOPS = {
    "NVIDIA H100 SXM (bf16 dense)": 989.0,
    "NVIDIA RTX A6000, 48 GB like the paper's GPU (bf16 dense)": 154.8,
}
ASSUMED_MFU = (0.2, 0.4)  # a range typical of convolution-heavy vision models in bf16; not measured here


def make_step(model, optimizer, inputs, device: str, dtype: torch.dtype):
    def step():
        with autocast_context(device, dtype):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def gemm_rate_function(device: str, size: int = 2048):
    """A square matrix multiply in fp32 (CPU) or bf16 (GPU): the machine's practical peak, timed like the steps."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * size**3


def run(args) -> dict:
    setup_threads(args.device, args.threads)
    on_gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    functions, models = {}, {}
    sizes = input_sizes(args.config, args.image_size)
    for variant in ("baseline", "sera"):
        log(f"training throughput: building {variant} (PEFT regime)")
        model = build_model(args.config, variant, args.device).train()
        model.freeze_encoders()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        inputs = make_inputs(model.config, sizes, args.batch_size, device=args.device, labels=True)
        functions[variant] = make_step(model, optimizer, inputs, args.device, dtype)
        models[variant] = model
    gemm, gemm_flops = gemm_rate_function(args.device)
    # Many multiplies per round, so that the reference takes a comparable share of each round.
    gemm_calls = 10
    functions["gemm"] = lambda: [gemm() for _ in range(gemm_calls)]

    log(f"training throughput: batch {args.batch_size}, {args.repeats} interleaved rounds")
    seconds = interleaved_timing(functions, args.repeats, args.warmup, args.device, log=log)
    summary = ratio_summary(seconds, "baseline")
    image_size = sizes[0]

    flops = {
        variant: count_flops(args.config, args.image_size, variant, backward=True) for variant in ("baseline", "sera")
    }
    forward_flops = {variant: count_flops(args.config, args.image_size, variant) for variant in ("baseline", "sera")}
    if on_gpu:
        peak = args.peak_tflops * 1e12
        peak_label = f"{torch.cuda.get_device_name()} dense bf16 peak ({args.peak_tflops:g} TFLOP/s, given)"
    else:
        gemm_seconds = sorted(seconds["gemm"])[len(seconds["gemm"]) // 2] / gemm_calls
        peak = gemm_flops / gemm_seconds
        peak_label = (
            f"this CPU's measured fp32 GEMM rate ({peak / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} thread(s))"
        )

    rows = {}
    for variant in ("baseline", "sera"):
        step_seconds = summary[variant]["median_s"]
        images_per_s = args.batch_size / step_seconds
        achieved = flops[variant] * images_per_s
        # MFU from the per-round ratio to the GEMM reference, which the shared machine slows down alike.
        gemm_ratio = sorted((s / (g / gemm_calls)) for s, g in zip(seconds[variant], seconds["gemm"]))[
            len(seconds[variant]) // 2
        ]
        interleaved_mfu = flops[variant] * args.batch_size / (gemm_ratio * gemm_flops) if not on_gpu else None
        rows[variant] = {
            "step_s": step_seconds,
            "images_per_s": images_per_s,
            "ratio_to_baseline": summary[variant]["ratio"],
            "ratio_to_baseline_range": [summary[variant]["ratio_min"], summary[variant]["ratio_max"]],
            "train_gflop_per_image": flops[variant] / 1e9,
            "forward_gflop_per_image": forward_flops[variant] / 1e9,
            "achieved_gflops": achieved / 1e9,
            "mfu": interleaved_mfu if interleaved_mfu is not None else achieved / peak,
            "seconds": seconds[variant],
        }

    samples = REFCOCO_TRAIN_OBJECTS * RECIPE_EPOCHS
    recipe = {
        "samples": samples,
        "train_pflop": flops["sera"] * samples / 1e15,
        "measured_hours_here": samples / rows["sera"]["images_per_s"] / 3600,
        "estimates": [
            {
                "gpu": name,
                "assumed_mfu": mfu,
                "hours": flops["sera"] * samples / (tflops * 1e12 * mfu) / 3600,
            }
            for name, tflops in GPU_PEAKS_TFLOPS.items()
            for mfu in ASSUMED_MFU
        ],
    }
    return {
        "machine": machine_info(args.device),
        "config": args.config,
        "image_size": image_size,
        "batch_size": args.batch_size,
        "dtype": "bf16 autocast" if on_gpu else "fp32",
        "peak": peak_label,
        "gemm_seconds": seconds["gemm"],
        "rows": rows,
        "recipe": recipe,
    }


def format_results(results: dict) -> str:
    header = [
        "variant (PEFT regime)",
        "batch",
        "step s",
        "images/s",
        "time vs baseline (min-max)",
        "train GFLOP/image",
        "achieved GFLOP/s",
        "MFU",
    ]
    rows = []
    for variant, entry in results["rows"].items():
        low, high = entry["ratio_to_baseline_range"]
        rows.append(
            [
                {"baseline": "baseline (no SERA modules)", "sera": "SERA"}[variant],
                results["batch_size"],
                f"{entry['step_s']:.2f}",
                f"{entry['images_per_s']:.3f}",
                f"{entry['ratio_to_baseline']:.3f}x ({low:.2f}-{high:.2f})",
                f"{entry['train_gflop_per_image']:.0f}",
                f"{entry['achieved_gflops']:.0f}",
                f"{entry['mfu']:.1%}",
            ]
        )
    text = markdown_table(header, rows, align="lrrrrrrr") + f"\n\nMFU against {results['peak']}."
    recipe = results["recipe"]
    text += (
        f"\n\n65-epoch RefCOCO recipe: {recipe['samples']:,} samples, {recipe['train_pflop']:,.0f} PFLOP; "
        f"at the rate measured here: {recipe['measured_hours_here']:,.0f} hours.\n\n"
    )
    text += markdown_table(
        ["GPU (estimate, not measured)", "assumed MFU", "hours for 65 epochs"],
        [[e["gpu"], f"{e['assumed_mfu']:.0%}", f"{e['hours']:.1f}"] for e in recipe["estimates"]],
        align="lrr",
    )
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="Default: 16 on GPU, 2 on CPU.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100 SXM: 989).")
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = 16 if args.device.startswith("cuda") else 2
    results = run(args)
    write_json(args.output, results)
    print(format_results(results))


if __name__ == "__main__":
    main()
