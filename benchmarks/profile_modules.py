"""Where SERA's forward time goes, by module, next to where its FLOPs go.

    python benchmarks/profile_modules.py                       # real size (hub_configs/sera-refcoco), batch 1
    python benchmarks/profile_modules.py --batch-size 4 --ops  # also the top aten operators (torch.profiler)

Each module group is timed with forward pre/post hooks (wall clock, device synchronised at each hook), over several
forwards (median). FLOPs per group come from `torch.utils.flop_counter.FlopCounterMode` on the meta device. A group
whose achieved GFLOP/s is far below the model's average is where time is lost beyond its arithmetic.

On a GPU, synchronising at every module makes small modules look slower than they are, so a second profile runs
without it (torch.profiler): per group, the GPU time of its kernels and the host time spent issuing them.
"""

import argparse
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from benchmark_utils import (
    VARIANTS,
    add_common_arguments,
    build_model,
    input_sizes,
    log,
    machine_info,
    make_inputs,
    markdown_table,
    setup_threads,
    synchronize,
    write_json,
)
from torch.utils.flop_counter import FlopCounterMode


# (group, regular expression on the module's qualified name); the first match wins. Groups may nest (an adapter
# inside a vision block): every group gets the time of its modules minus that of the hooked modules inside them.
GROUPS = [
    ("text encoder (CLIP)", r"model\.text_model"),
    ("vision embeddings", r"model\.vision_model\.embeddings"),
    ("vision self-attention", r"model\.vision_model\.encoder\.layer\.\d+\.attention"),
    ("vision MLP (frozen)", r"model\.vision_model\.encoder\.layer\.\d+\.mlp(\.base_layer)?"),
    ("vision blocks: norms, LayerScale, residuals", r"model\.vision_model(\.encoder\.layer\.\d+)?"),
    ("SERA-Adapter: down/up projections", r".*\.sera_adapter\.(down_proj|up_proj)"),
    ("SERA-Adapter: multi-scale enrichment", r".*\.sera_adapter\.enrichment"),
    ("SERA-Adapter: experts + soft router", r".*\.sera_adapter\.(spatial_expert|boundary_expert|router)"),
    ("SERA-Adapter: word cross-attention", r".*\.sera_adapter\.word_attention"),
    ("SERA-Adapter: reshapes, skip, mixing", r".*\.sera_adapter"),
    ("SERA-Fusion: router", r"model\.fusion\.\d+\.router"),
    ("SERA-Fusion: spatial expert", r"model\.fusion\.\d+\.experts\.spatial"),
    ("SERA-Fusion: context expert", r"model\.fusion\.\d+\.experts\.context"),
    ("SERA-Fusion: boundary expert", r"model\.fusion\.\d+\.experts\.boundary"),
    ("SERA-Fusion: shape expert", r"model\.fusion\.\d+\.experts\.shape"),
    ("SERA-Fusion: mixing of expert outputs", r"model\.fusion\.\d+"),
    ("neck", r"model\.neck"),
    ("decoder", r"model\.decoder"),
    ("projector", r"projector"),
]
GLUE = "rest (level reshapes, word projection, output)"


def group_of(name: str, module: torch.nn.Module | None = None) -> str | None:
    if module is not None and hasattr(module, "sera_adapter"):
        return "SERA-Adapter: reshapes, skip, mixing"  # the wrapper that adds the adapter to the frozen MLP
    for group, pattern in GROUPS:
        if re.fullmatch(pattern, name):
            return group
    return None


def hooked_modules(model: torch.nn.Module) -> dict[str, str]:
    """Qualified name -> group, for every module that belongs to a group."""
    return {name: group for name, module in model.named_modules() if (group := group_of(name, module)) is not None}


def nearest_hooked_parent(name: str, hooked: dict[str, str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:end])
        if parent in hooked:
            return parent
    return None


class SelfCostByGroup:
    """Accumulates, per module group, a reading's change across each hooked module minus the change across the
    hooked modules it calls: the group's own cost. `read()` gives the reading (a clock, live bytes...)."""

    def __init__(self, model: torch.nn.Module, read: Callable[[], float], zero: float = 0.0):
        self.read = read
        self.totals = defaultdict(lambda: zero)
        self.stack = []  # [reading at entry, change spent in hooked children]
        self.handles = []
        for name, group in hooked_modules(model).items():
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(self._pre_hook))
            self.handles.append(module.register_forward_hook(self._post_hook(group)))

    def _pre_hook(self, module, args):
        self.stack.append([self.read(), 0])

    def _post_hook(self, group):
        def hook(module, args, output):
            start, in_children = self.stack.pop()
            change = self.read() - start
            self.totals[group] += change - in_children
            if self.stack:
                self.stack[-1][1] += change

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ModuleTimer(SelfCostByGroup):
    """Self time per group over forwards: a hooked module's wall time minus that of the hooked modules it calls."""

    def __init__(self, model: torch.nn.Module, device: str):
        def clock() -> float:
            synchronize(device)  # the GPU's queued work belongs to the module that queued it
            return time.perf_counter()

        super().__init__(model, clock)
        self.seconds = self.totals


def flops_by_group(config_path, variant: str, image_size: int | None, batch_size: int) -> dict[str, float]:
    """Self FLOPs per group (like the times), counted on the meta device: no memory, no compute."""
    with torch.device("meta"):
        model = build_model(config_path, variant, device="meta").eval()
        inputs = make_inputs(model.config, input_sizes(config_path, image_size), batch_size, device="meta")
    counter = FlopCounterMode(display=False, depth=100)
    with counter, torch.no_grad():
        # No attention_mask on meta: the text tower inspects the mask's values to pick a fast path.
        model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"])
    inclusive = defaultdict(float)
    for key, counts in counter.get_flop_counts().items():
        if "." in key:  # "SeraForReferringSegmentation.model.neck" -> "model.neck"; "Global" is the total
            inclusive[key.split(".", 1)[1]] = sum(counts.values())
    hooked = hooked_modules(model)
    flops = defaultdict(float)
    for name, group in hooked.items():
        flops[group] += inclusive[name]
        parent = nearest_hooked_parent(name, hooked)
        if parent is not None:
            flops[hooked[parent]] -= inclusive[name]
    flops[GLUE] = counter.get_total_flops() - sum(flops.values())
    return dict(flops)


def profile(args) -> dict:
    setup_threads(args.device, args.threads)
    model = build_model(args.config, args.variant, device=args.device).eval()
    sizes = input_sizes(args.config, args.image_size)
    inputs = make_inputs(model.config, sizes, args.batch_size, device=args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model.to(dtype)
    log(f"profile_modules: {args.variant}, batch {args.batch_size}, image {sizes[0]}, {args.device}")

    with torch.inference_mode():
        model(**inputs)  # warm-up
        timer = ModuleTimer(model, args.device)
        runs = []
        for run in range(args.repeats):
            timer.seconds.clear()
            synchronize(args.device)
            start = time.perf_counter()
            model(**inputs)
            synchronize(args.device)
            total = time.perf_counter() - start
            seconds = dict(timer.seconds)
            seconds[GLUE] = total - sum(seconds.values())
            runs.append((total, seconds))
            log(f"  forward {run + 1}/{args.repeats}: {total:.3f}s")
        timer.remove()

    total = statistics.median(run[0] for run in runs)
    seconds = {group: statistics.median(run[1][group] for run in runs) for group in runs[0][1]}
    flops = flops_by_group(args.config, args.variant, args.image_size, args.batch_size)
    total_flops = sum(flops.values())
    rows = []
    for group in sorted(seconds, key=seconds.get, reverse=True):
        if seconds[group] <= 0 and flops.get(group, 0) == 0:
            continue
        rate = flops.get(group, 0.0) / seconds[group] / 1e9 if seconds[group] > 0 else float("nan")
        rows.append(
            {
                "group": group,
                "ms": 1e3 * seconds[group],
                "time_share": seconds[group] / total,
                "gflop": flops.get(group, 0.0) / 1e9,
                "flop_share": flops.get(group, 0.0) / total_flops,
                "gflops_per_s": rate,
            }
        )
    result = {
        "machine": machine_info(args.device),
        "variant": args.variant,
        "batch_size": args.batch_size,
        "image_size": sizes[0],
        "dtype": str(dtype),
        "total_ms": 1e3 * total,
        "total_gflop": total_flops / 1e9,
        "rows": rows,
    }
    if args.ops:
        result["top_ops"] = top_operators(model, inputs, args.device)
    if args.device.startswith("cuda"):
        traced = host_and_device_time_by_group(model, inputs, args.device)
        result["trace_rows"] = [
            {"group": group, **times, "gflop": flops.get(group, 0.0) / 1e9}
            for group, times in sorted(traced.items(), key=lambda item: item[1]["device_ms"], reverse=True)
        ]
    return result


RANGE_PREFIX = "sera_profile::"


def host_and_device_time_by_group(model, inputs, device: str, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per group, without synchronising: the host time spent issuing its work and the device time of the kernels
    it launched (torch.profiler). Each hooked module runs inside a profiler range named after it; a kernel belongs
    to the innermost range around the operator that launched it. Where host time exceeds device time, the group
    is bound by Python and kernel launches, not by the GPU."""
    hooked = hooked_modules(model)
    ranges, handles = [], []
    for name in hooked:
        module = model.get_submodule(name)

        def enter(module, args, label=RANGE_PREFIX + name):
            ranges.append(torch.profiler.record_function(label))
            ranges[-1].__enter__()

        def leave(module, args, output):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.inference_mode(), torch.profiler.profile(activities=activities) as profiler:
            for _ in range(repeats):
                model(**inputs)
            synchronize(device)
    finally:
        for handle in handles:
            handle.remove()

    def enclosing_group(event) -> str | None:
        """The group of the innermost range around `event` (itself included), or None outside every range."""
        while event is not None:
            if event.name.startswith(RANGE_PREFIX):
                return hooked[event.name[len(RANGE_PREFIX) :]]
            event = event.cpu_parent
        return None

    totals = defaultdict(lambda: {"host_ms": 0.0, "device_ms": 0.0})
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        if event.name.startswith(RANGE_PREFIX):
            # Host time of a range, less that of the ranges directly inside it, is the group's own host time.
            host_ms = event.cpu_time_total / 1e3 / repeats
            totals[enclosing_group(event)]["host_ms"] += host_ms
            outer = enclosing_group(event.cpu_parent)
            if outer is not None:
                totals[outer]["host_ms"] -= host_ms
        kernel_us = sum(kernel.duration for kernel in event.kernels if not kernel.name.startswith(RANGE_PREFIX))
        if kernel_us:
            totals[enclosing_group(event) or GLUE]["device_ms"] += kernel_us / 1e3 / repeats
    return dict(totals)


def top_operators(model, inputs, device: str, count: int = 12, shapes: bool = False) -> list[dict]:
    """Self time per aten operator (and kernel) over one forward (torch.profiler); with `shapes`, per input shapes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), torch.profiler.profile(activities=activities, record_shapes=shapes) as profiler:
        model(**inputs)
    attribute = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(
        profiler.key_averages(group_by_input_shape=shapes), key=lambda event: getattr(event, attribute), reverse=True
    )
    total = sum(getattr(event, attribute) for event in events)
    rows = []
    for event in events[:count]:
        row = {"op": event.key, "ms": getattr(event, attribute) / 1e3, "share": getattr(event, attribute) / total}
        if shapes and event.input_shapes:
            row["shapes"] = str([shape for shape in event.input_shapes if shape])
        rows.append(row)
    return rows


def format_result(result: dict) -> str:
    rows = [
        [
            row["group"],
            f"{row['ms']:.0f}",
            f"{row['time_share']:.1%}",
            f"{row['gflop']:.1f}",
            f"{row['flop_share']:.1%}",
            f"{row['gflops_per_s']:.0f}",
        ]
        for row in result["rows"]
    ]
    text = markdown_table(["module group", "ms", "share of time", "GFLOP", "share of FLOPs", "GFLOP/s"], rows)
    text += (
        f"\n\nWhole forward: {result['total_ms']:.0f} ms, {result['total_gflop']:.1f} GFLOP, "
        f"{result['total_gflop'] / result['total_ms'] * 1e3:.0f} GFLOP/s"
    )
    if "trace_rows" in result:
        trace = result["trace_rows"]
        device_total = sum(row["device_ms"] for row in trace)
        host_total = sum(row["host_ms"] for row in trace)
        text += (
            "\n\nWithout synchronising (torch.profiler): GPU time of each group's kernels against the host time spent "
            "issuing them; host > GPU means the group waits on Python and kernel launches, not on the GPU.\n\n"
        )
        text += markdown_table(
            ["module group", "GPU ms", "share of GPU time", "host ms", "host / GPU", "TFLOP/s on GPU time"],
            [
                [
                    row["group"],
                    f"{row['device_ms']:.2f}",
                    f"{row['device_ms'] / device_total:.1%}",
                    f"{row['host_ms']:.2f}",
                    f"{row['host_ms'] / row['device_ms']:.1f}" if row["device_ms"] > 0 else "-",
                    f"{row['gflop'] / row['device_ms']:.0f}" if row["device_ms"] > 0 else "-",
                ]
                for row in trace
            ],
        )
        text += f"\n\nKernels: {device_total:.1f} ms of GPU time per forward; host: {host_total:.1f} ms."
    if "top_ops" in result:
        text += "\n\n" + markdown_table(
            ["aten operator", "self ms", "share"],
            [[f"`{op['op']}`", f"{op['ms']:.0f}", f"{op['share']:.1%}"] for op in result["top_ops"]],
        )
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--variant", default="sera", choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="Cast the model to bfloat16 (the GPU setting).")
    parser.add_argument("--ops", action="store_true", help="Also list the top aten operators (torch.profiler).")
    args = parser.parse_args()
    result = profile(args)
    write_json(args.output, result)
    print(format_result(result))


if __name__ == "__main__":
    main()
