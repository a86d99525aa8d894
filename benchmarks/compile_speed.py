"""Does SERA run under `torch.compile`, where does the graph break, and what does compiling gain?

    python benchmarks/compile_speed.py                          # real size, batch 1 (GPU: bf16)
    python benchmarks/compile_speed.py --config hub_configs/sera-synthref-tiny

Reports the graph breaks (`torch._dynamo.explain`), the compile time (first call), the largest difference between
compiled and eager logits, and the eager and compiled forward timed in interleaved rounds (ratio compiled / eager).
"""

import argparse
import time
from contextlib import nullcontext

import torch
import torch._inductor.config
from benchmark_utils import (
    add_common_arguments,
    build_model,
    input_sizes,
    interleaved_timing,
    log,
    machine_info,
    make_inputs,
    markdown_table,
    ratio_summary,
    setup_threads,
    synchronize,
    write_json,
)
from profile_modules import top_operators
from torch.nn.attention import SDPBackend, sdpa_kernel


SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def graph_breaks(model, inputs) -> dict:
    explanation = torch._dynamo.explain(model)(**inputs)
    reasons = {}
    for item in explanation.break_reasons:
        frame = item.user_stack[-1] if item.user_stack else None
        where = f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}" if frame else "?"
        reason = item.reason.strip().splitlines()[0]
        reasons[f"{reason} ({where})"] = reasons.get(f"{reason} ({where})", 0) + 1
    torch._dynamo.reset()
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count, "reasons": reasons}


def exporting_flag_under_compile() -> bool:
    """`torch.compiler.is_exporting()` as code inside `torch.compile` sees it.

    transformers skips the vision encoder's all-true attention mask only when this is False. Where it is True
    (torch 2.11 on our GPU machine), the mask is materialised with stride 0, no fused SDPA kernel accepts it, and
    attention runs on the unfused math path in fp32.
    """

    @torch.compile(backend="eager", fullgraph=True)
    def probe(flag: torch.Tensor) -> torch.Tensor:
        return flag + 1 if torch.compiler.is_exporting() else flag

    return bool(probe(torch.zeros(1)).item() == 1)


def run(args) -> dict:
    setup_threads(args.device, args.threads)
    if not args.warm_cache:
        # A cold compile, as a user's first run gets it: the on-disk caches of earlier runs would hide its cost.
        torch._inductor.config.force_disable_caches = True
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_model(args.config, "sera", args.device, dtype).eval()
    sizes = input_sizes(args.config, args.image_size)
    inputs = make_inputs(model.config, sizes, args.batch_size, device=args.device)

    # Restricting SDPA's backends (--sdpa-backends flash efficient) shows whether a slow compiled graph comes from
    # attention lowered to the unfused math path.
    backends = [SDPA_BACKENDS[name] for name in args.sdpa_backends] if args.sdpa_backends else None
    with torch.inference_mode(), sdpa_kernel(backends) if backends else nullcontext():
        breaks = graph_breaks(model, inputs)
        log(f"compile: {breaks['graphs']} graphs, {breaks['breaks']} breaks; compiling (mode={args.mode})")
        compiled = torch.compile(model, mode=args.mode)
        synchronize(args.device)
        start = time.perf_counter()
        compiled_logits = compiled(**inputs).logits
        synchronize(args.device)
        compile_seconds = time.perf_counter() - start
        eager_logits = model(**inputs).logits
        difference = (compiled_logits.float() - eager_logits.float()).abs().max().item()
        scale = eager_logits.float().abs().max().item()
        seconds = interleaved_timing(
            {"eager": lambda: model(**inputs), "compiled": lambda: compiled(**inputs)},
            args.repeats,
            warmup=1,
            device=args.device,
            log=log,
        )
        operators = None
        if args.ops:
            operators = {
                name: top_operators(forward, inputs, args.device, count=15, shapes=True)
                for name, forward in (("eager", model), ("compiled", compiled))
            }
    summary = ratio_summary(seconds, "eager")
    return {
        "is_exporting_under_compile": exporting_flag_under_compile(),
        "sdpa_backends": args.sdpa_backends,
        "top_ops": operators,
        "machine": machine_info(args.device),
        "config": args.config,
        "image_size": sizes[0],
        "batch_size": args.batch_size,
        "dtype": str(dtype),
        "mode": args.mode,
        "graph_breaks": breaks,
        "compile_seconds": compile_seconds,
        "cold_compile": not args.warm_cache,
        "max_abs_logit_difference": difference,
        "max_abs_logit": scale,
        "timing": summary,
        "seconds": seconds,
    }


def format_results(results: dict) -> str:
    timing = results["timing"]
    rows = [
        [
            name,
            f"{1e3 * timing[name]['median_s']:.0f}",
            f"{timing[name]['ratio']:.3f}x ({timing[name]['ratio_min']:.2f}-{timing[name]['ratio_max']:.2f})",
        ]
        for name in ("eager", "compiled")
    ]
    text = markdown_table(["SERA forward", "latency ms", "vs eager (min-max)"], rows)
    breaks = results["graph_breaks"]
    text += (
        f"\n\nCompiles and runs: {breaks['graphs']} graphs, {breaks['breaks']} graph breaks; first call "
        f"({'cold' if results.get('cold_compile') else 'warm-cache'} compile) {results['compile_seconds']:.0f} s; largest |compiled - eager| logit difference "
        f"{results['max_abs_logit_difference']:.2e} (logits up to {results['max_abs_logit']:.2f})."
    )
    if results.get("is_exporting_under_compile"):
        text += (
            "\n\n`torch.compiler.is_exporting()` is True inside `torch.compile` with this torch: transformers then hands "
            "the vision encoder's SDPA a materialised all-true mask, which rules out the fused attention kernels."
        )
    if breaks["reasons"]:
        text += "\n\nGraph breaks:\n" + "\n".join(
            f"- {count}x {reason}" for reason, count in breaks["reasons"].items()
        )
    for name, operators in (results.get("top_ops") or {}).items():
        text += f"\n\nTop operators, {name}:\n\n" + markdown_table(
            ["operator", "self ms", "share"],
            [
                [f"`{op['op'][:70]}` {op.get('shapes', '')}", f"{op['ms']:.2f}", f"{op['share']:.1%}"]
                for op in operators
            ],
        )
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune, ...).")
    parser.add_argument("--ops", action="store_true", help="Also list the top operators, eager and compiled.")
    parser.add_argument(
        "--sdpa-backends", nargs="+", choices=list(SDPA_BACKENDS), help="Allow only these attention kernels."
    )
    parser.add_argument("--warm-cache", action="store_true", help="Let inductor reuse its on-disk compile caches.")
    args = parser.parse_args()
    results = run(args)
    write_json(args.output, results)
    print(format_results(results))


if __name__ == "__main__":
    main()
