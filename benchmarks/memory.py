"""Peak memory of one SERA training step (forward, backward, Adam step) in three regimes.

    python benchmarks/memory.py                          # real size; CPU: batch 2 measured, batch 16 counted
    python benchmarks/memory.py --device cuda            # GPU: torch.cuda.max_memory_allocated, bf16 autocast

Regimes, all with the paper's optimiser (Adam) on the same model:

- `peft`: `model.freeze_encoders()`, the trainable set of the paper and of the PEFT tuner (encoders frozen except
  their LayerNorm and bias terms; SERA-Adapters, SERA-Fusion, neck, decoder and projector train);
- `full`: every parameter trains;
- `peft+checkpointing`: `peft` with `model.activation_checkpointing_enable()`.

How memory is measured. On a GPU, `torch.cuda.max_memory_allocated` over the second step. On a CPU there is no
allocator to ask, so `TensorMemoryTracker` below counts it the way the CUDA allocator's `memory_allocated` would:
every tensor storage created by an operator is added when it appears and removed (by a weakref finalizer) when it is
freed; the peak of that sum over the second step is the figure (the first step also allocates the gradients and the
Adam state, the second is the steady state). What it does not see: kernels' internal scratch buffers and allocator
overhead. Because it counts storages, not bytes touched, it works on fake tensors too: `--count-batch-size` runs the
same step under `FakeTensorMode` (no compute, no memory) to give the peak at the paper's batch of 16, and the script
checks that counting agrees with measuring at the small batch. Each regime also runs in a fresh subprocess that
reports its peak resident set growth (VmHWM), a cross-check that includes everything the tracker cannot see.
"""

import argparse
import contextlib
import gc
import json
import subprocess
import sys
import time
import weakref

import torch
from benchmark_utils import (
    add_common_arguments,
    autocast_context,
    build_model,
    input_sizes,
    load_config,
    log,
    machine_info,
    make_inputs,
    markdown_table,
    setup_threads,
    write_json,
)
from profile_modules import SelfCostByGroup
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


REGIMES = ("peft", "full", "peft+checkpointing")
REGIME_NAMES = {
    "peft": "SERA, PEFT regime (`freeze_encoders()`)",
    "full": "SERA, full fine-tuning",
    "peft+checkpointing": "SERA, PEFT regime + activation checkpointing",
}
GIB = 2**30


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created inside it (plus those given to `track`), and their peak."""

    def __init__(self):
        super().__init__()
        self._sizes = WeakIdKeyDictionary()  # storage -> [bytes], a list so that a finalizer sees resizes
        self.current = 0
        self.peak = 0

    def track(self, *tensors) -> None:
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            nbytes = storage.nbytes()
            record = self._sizes.get(storage)
            if record is None:
                record = [0]
                self._sizes[storage] = record
                weakref.finalize(storage, self._release, record)
            # New storage, or one that an out= or resize_ operator grew.
            self.current += nbytes - record[0]
            record[0] = nbytes
            self.peak = max(self.peak, self.current)

    def _release(self, record) -> None:
        self.current -= record[0]

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        self.track(*tree_flatten(output)[0])
        return output


class RetainedMemoryByGroup(SelfCostByGroup):
    """Bytes each module group leaves alive at the end of its forward (what it saved for backward, and its output),
    less what the hooked groups inside it left: where the activation memory of a training step sits."""

    def __init__(self, model: torch.nn.Module, tracker: TensorMemoryTracker):
        super().__init__(model, lambda: tracker.current, zero=0)
        self.bytes = self.totals


def tensor_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage.nbytes()
    return sum(storages.values())


def prepare(regime: str, config_path, device: str, meta_model=None):
    if meta_model is not None:
        # Initialisers read values, which fake tensors cannot give: a model built on the meta device gets fake
        # storage on the CPU from the active FakeTensorMode instead.
        model = meta_model.to_empty(device="cpu")
    else:
        model = build_model(config_path, "sera", device=device)
    model.train()
    if regime in ("peft", "peft+checkpointing"):
        model.freeze_encoders()
    if regime == "peft+checkpointing":
        model.activation_checkpointing_enable()
    parameters = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    return model, optimizer


def training_step(model, optimizer, inputs, device: str, dtype: torch.dtype, phases: dict | None = None, tracker=None):
    """One step; with a tracker, records the peak of each phase and the live memory after it."""

    def mark(phase):
        if tracker is not None and phases is not None:
            phases[phase] = {"peak": tracker.peak, "after": tracker.current}
            tracker.reset_peak()

    with autocast_context(device, dtype):
        loss = model(**inputs).loss
    mark("forward")
    loss.backward()
    del loss
    mark("backward")
    optimizer.step()
    mark("optimizer step")
    optimizer.zero_grad(set_to_none=True)


def measure_cpu(regime: str, args, batch_size: int, fake: bool, **overrides) -> dict:
    """Tensor memory of the second training step, on CPU tensors or (fake=True) on fake ones."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    sizes = input_sizes(args.config, args.image_size)
    real_inputs = make_inputs(load_config(args.config), sizes, batch_size, labels=True)
    if fake:
        # The text tower reads the mask's values to choose a fast path, which fake tensors cannot answer; the mask
        # changes no allocation size, so the counted step runs without it.
        real_inputs.pop("attention_mask")
    meta_model = None
    if fake:
        meta_model = build_model(args.config, "sera", device="meta", **overrides)
    elif overrides:
        raise ValueError("Config overrides are only used for counting on fake tensors.")
    with fake_mode:
        model, optimizer = prepare(regime, args.config, "cpu", meta_model)
        inputs = {key: fake_mode.from_tensor(value) for key, value in real_inputs.items()} if fake else real_inputs
        tracker = TensorMemoryTracker()
        tracker.track(*model.parameters(), *model.buffers(), *inputs.values())
        parameter_bytes = tensor_bytes(list(model.parameters()))
        start = time.perf_counter()
        with tracker:
            live_before = tracker.current
            training_step(model, optimizer, inputs, "cpu", torch.float32)
            first_step = time.perf_counter() - start
            first_step_growth = tracker.peak - live_before
            tracker.reset_peak()
            phases = {}
            by_group = RetainedMemoryByGroup(model, tracker)
            training_step(model, optimizer, inputs, "cpu", torch.float32, phases, tracker)
            by_group.remove()
        trainable = [param for param in model.parameters() if param.requires_grad]
        optimizer_bytes = tensor_bytes(
            [value for state in optimizer.state.values() for value in state.values() if value.dim() > 0]
        )
    peak = max(phase["peak"] for phase in phases.values())
    return {
        "regime": regime,
        "batch_size": batch_size,
        "method": "counted on fake tensors" if fake else "measured (tensor storages)",
        "peak_bytes": peak,
        "parameter_bytes": parameter_bytes,
        "gradient_bytes": sum(param.numel() * param.element_size() for param in trainable),
        "optimizer_state_bytes": optimizer_bytes,
        "trainable_parameters": sum(param.numel() for param in trainable),
        "phases": phases,
        "first_step_growth_bytes": first_step_growth,
        "retained_after_forward_by_group": dict(by_group.bytes),
        "first_step_s": None if fake else first_step,
    }


def measure_cuda(regime: str, args, batch_size: int) -> dict:
    # The regimes run one after another in this process: the last one's tensors must be gone before this peak.
    gc.collect()
    torch.cuda.empty_cache()
    model, optimizer = prepare(regime, args.config, args.device)
    inputs = make_inputs(
        model.config, input_sizes(args.config, args.image_size), batch_size, device=args.device, labels=True
    )
    training_step(model, optimizer, inputs, args.device, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    training_step(model, optimizer, inputs, args.device, torch.bfloat16)
    torch.cuda.synchronize()
    trainable = [param for param in model.parameters() if param.requires_grad]
    return {
        "regime": regime,
        "batch_size": batch_size,
        "method": "torch.cuda.max_memory_allocated (bf16 autocast)",
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "reserved_bytes": torch.cuda.max_memory_reserved(),
        "parameter_bytes": tensor_bytes(list(model.parameters())),
        "gradient_bytes": sum(param.numel() * param.element_size() for param in trainable),
        "optimizer_state_bytes": tensor_bytes(
            [value for state in optimizer.state.values() for value in state.values() if value.dim() > 0]
        ),
        "trainable_parameters": sum(param.numel() for param in trainable),
    }


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}.")


def rss_child(regime: str, args) -> dict:
    """Peak resident memory growth of one step, in this (fresh) process: run by `rss_cross_check`.

    Reads the high-water mark of this process's own memory map (VmHWM), reset just before the step when the kernel
    allows it (`/proc/self/clear_refs`). Not `ru_maxrss`: Linux carries that across `exec` from the parent.
    """
    model, optimizer = prepare(regime, args.config, "cpu")
    inputs = make_inputs(model.config, input_sizes(args.config, args.image_size), args.batch_size, labels=True)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
    except OSError:
        pass
    resident_before = _status_bytes("VmRSS")
    peak_before = _status_bytes("VmHWM")
    # One step: its peak (during the backward pass) already holds the gradients; the Adam state comes after.
    training_step(model, optimizer, inputs, "cpu", torch.float32)
    peak_after = _status_bytes("VmHWM")
    return {
        "regime": regime,
        "rss_before": resident_before,
        "rss_peak": peak_after,
        "step_set_the_peak": peak_after > peak_before,
    }


def rss_cross_check(regime: str, args) -> dict:
    command = [sys.executable, __file__, "--rss-child", regime, "--config", args.config, "--batch-size"]
    command += [str(args.batch_size), "--threads", str(torch.get_num_threads())]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(args) -> dict:
    setup_threads(args.device, args.threads)
    results = {"machine": machine_info(args.device), "config": args.config, "image_size": args.image_size}
    if args.device.startswith("cuda"):
        results["measured"] = {regime: measure_cuda(regime, args, args.batch_size) for regime in args.regimes}
        return results
    for key in ("measured", "counted", "counted_fused_attention", "counted_small", "rss"):
        results[key] = {}
    for regime in args.regimes:
        log(f"memory: {regime}, batch {args.batch_size} measured")
        results["measured"][regime] = measure_cpu(regime, args, args.batch_size, fake=False)
        log(f"memory: {regime}, batch {args.batch_size} counted on fake tensors (agreement check)")
        results["counted_small"][regime] = measure_cpu(regime, args, args.batch_size, fake=True)
        if args.count_batch_size:
            log(f"memory: {regime}, batch {args.count_batch_size} counted on fake tensors")
            results["counted"][regime] = measure_cpu(regime, args, args.count_batch_size, fake=True)
            # With dropout, CPU attention falls back to a kernel that stores the (L x L) attention maps; fused GPU
            # kernels (flash, memory-efficient) keep only a random seed. Counting with the decoder's dropout off
            # gives what a GPU's attention stores.
            log(
                f"memory: {regime}, batch {args.count_batch_size} counted, decoder attention as fused kernels store it"
            )
            results["counted_fused_attention"][regime] = measure_cpu(
                regime, args, args.count_batch_size, fake=True, decoder_dropout=0.0
            )
        if args.rss:
            log(f"memory: {regime}, resident set cross-check in a fresh process")
            results["rss"][regime] = rss_cross_check(regime, args)
    return results


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def format_results(results: dict) -> str:
    sections = []
    tables = ["measured"] + [key for key in ("counted", "counted_fused_attention") if results.get(key)]
    for key in tables:
        rows = []
        entries = results[key]
        reference = entries.get("full")
        for regime, entry in entries.items():
            ratio = entry["peak_bytes"] / reference["peak_bytes"] if reference else float("nan")
            rows.append(
                [
                    REGIME_NAMES[regime],
                    entry["batch_size"],
                    gib(entry["peak_bytes"]),
                    f"{ratio:.2f}",
                    gib(entry["parameter_bytes"]),
                    gib(entry["gradient_bytes"]),
                    gib(entry["optimizer_state_bytes"]),
                    gib(entry["peak_bytes"] - entry["parameter_bytes"] - entry["optimizer_state_bytes"]),
                ]
            )
        header = ["regime", "batch", "peak GiB", "vs full FT", "params", "grads", "Adam state", "peak - params - Adam"]
        method = entries[next(iter(entries))]["method"]
        if key == "counted_fused_attention":
            method += ", decoder attention stored as fused (GPU) kernels store it: decoder_dropout=0"
        sections.append(f"{method}:\n\n" + markdown_table(header, rows))
    counted = results.get("counted") or {}
    if "peft" in counted:
        # Not the checkpointed regime: inside a checkpointed layer nothing is kept, so "left behind" is not defined.
        by_group = {
            regime: entry["retained_after_forward_by_group"]
            for regime, entry in counted.items()
            if regime in ("peft", "full")
        }
        groups = sorted(by_group["peft"], key=by_group["peft"].get, reverse=True)
        regimes = list(by_group)
        rows = [[group] + [gib(by_group[regime].get(group, 0)) for regime in regimes] for group in groups]
        rows = [row for row in rows if any(float(cell) >= 0.01 for cell in row[1:])]
        sections.append(
            f"activation memory left by each module group at the end of the forward (GiB, counted, batch "
            f"{counted['peft']['batch_size']}):\n\n" + markdown_table(["module group", *regimes], rows)
        )
    if results.get("counted_small"):
        rows = []
        for regime, counted in results["counted_small"].items():
            measured = results["measured"][regime]["peak_bytes"]
            rows.append(
                [
                    REGIME_NAMES[regime],
                    f"{measured / 2**20:,.1f}",
                    f"{counted['peak_bytes'] / 2**20:,.1f}",
                    f"{counted['peak_bytes'] / measured - 1:+.2%}",
                ]
            )
        sections.append(
            f"agreement of counting (fake tensors) with measuring, batch {results['measured'][regime]['batch_size']}:"
            "\n\n" + markdown_table(["regime", "measured MiB", "counted MiB", "difference"], rows)
        )
    if results.get("rss"):
        rows = []
        for regime, entry in results["rss"].items():
            growth = entry["rss_peak"] - entry["rss_before"]
            tracked = results["measured"][regime]["first_step_growth_bytes"]
            note = "" if entry["step_set_the_peak"] else " (model building set the peak)"
            rows.append([REGIME_NAMES[regime], gib(growth) + note, gib(tracked), f"{growth / tracked:.2f}"])
        sections.append(
            "resident set cross-check, first step, fresh process per regime:\n\n"
            + markdown_table(["regime", "peak RSS growth GiB", "tracked growth GiB", "RSS / tracked"], rows)
        )
    return "\n\n".join(sections)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="Measured batch (default: 16 on GPU, 2 on CPU).")
    parser.add_argument("--count-batch-size", type=int, default=16, help="CPU: also count this batch on fake tensors.")
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="Skip the resident set cross-check.")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_size is None:
        args.batch_size = 16 if args.device.startswith("cuda") else 2
    if args.rss_child:
        setup_threads("cpu", args.threads)
        print(json.dumps(rss_child(args.rss_child, args)))
        return
    results = run(args)
    write_json(args.output, results)
    print(format_results(results))


if __name__ == "__main__":
    main()
