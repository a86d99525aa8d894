"""Run every SERA benchmark and write one summary, with the targets of the benchmark issue checked.

    python benchmarks/run_all.py            # real size (~20 minutes on 2 shared CPU cores; minutes on a GPU)
    python benchmarks/run_all.py --quick    # the same scripts, small: real widths at 224 px, tiny model for compile

Each benchmark runs in its own process (clean memory, its own thread setting) and writes JSON and its markdown
tables under `benchmarks/results/` (`benchmarks/results/quick/` with `--quick`); `summary.md` there gathers them.
`benchmarks/accuracy_ablations.py` runs last when it exists (with `--quick` when given).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
REAL_SIZE = str(REPO_ROOT / "hub_configs" / "sera-refcoco")
TINY = str(REPO_ROOT / "hub_configs" / "sera-synthref-tiny")

TARGETS = {
    "sera_over_baseline": 1.15,  # SERA adds at most 15% over the baseline
    "model_over_encoders": 1.5,  # the whole model at most 1.5x the encoders alone
    "peft_over_full_memory": 0.60,  # the PEFT regime at most 60% of full fine-tuning
}


def plan(quick: bool, on_gpu: bool) -> list[tuple[str, str, list[str]]]:
    """(name, script, arguments) of each run."""
    if on_gpu:
        size = ["--image-size", "224"] if quick else []
        rounds = "3" if quick else "20"
        return [
            ("speed", "speed.py", [*size, "--batch-sizes", "1", "16", "--repeats", rounds, "--warmup", "3"]),
            ("profile", "profile_modules.py", [*size, "--batch-size", "16", "--bf16", "--ops"]),
            ("memory", "memory.py", [*size, "--batch-size", "16"]),
            ("training", "training_throughput.py", [*size, "--batch-size", "16", "--repeats", rounds]),
            ("compile", "compile_speed.py", [*size, "--batch-size", "16", "--repeats", rounds]),
        ]
    if quick:
        size = ["--image-size", "224"]
        return [
            ("speed", "speed.py", [*size, "--batch-sizes", "1", "2", "--repeats", "3"]),
            ("profile", "profile_modules.py", [*size, "--repeats", "1"]),
            ("memory", "memory.py", [*size, "--batch-size", "1", "--count-batch-size", "16", "--no-rss"]),
            ("training", "training_throughput.py", [*size, "--batch-size", "1", "--repeats", "2"]),
            ("compile", "compile_speed.py", ["--config", TINY, "--repeats", "3"]),
        ]
    return [
        ("speed", "speed.py", ["--batch-sizes", "1", "4", "--repeats", "5", "3"]),
        ("profile", "profile_modules.py", ["--repeats", "2", "--ops"]),
        ("memory", "memory.py", ["--batch-size", "1", "--count-batch-size", "16"]),
        ("training", "training_throughput.py", ["--batch-size", "2", "--repeats", "3"]),
        ("compile", "compile_speed.py", ["--repeats", "3"]),
    ]


def run_step(name: str, script: str, arguments: list[str], output_dir: Path, extra: list[str]) -> dict:
    json_path = output_dir / f"{name}.json"
    command = [sys.executable, str(BENCHMARKS / script), *arguments, *extra, "--output", str(json_path)]
    print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, check=False, cwd=BENCHMARKS, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    (output_dir / f"{name}.md").write_text(completed.stdout)
    print(completed.stdout, flush=True)
    print(f"== {name}: {seconds:.0f} s, exit code {completed.returncode}", flush=True)
    return {
        "name": name,
        "command": " ".join(["python", f"benchmarks/{script}", *arguments, *extra]),
        "seconds": seconds,
        "returncode": completed.returncode,
        "markdown": completed.stdout,
        "results": json.loads(json_path.read_text()) if json_path.exists() else None,
    }


def check_targets(steps: dict) -> list[str]:
    lines = []
    speed = steps.get("speed", {}).get("results")
    if speed:
        for batch, rows in speed["batches"].items():
            sera = rows["sera"]
            over_baseline = sera["ratio_to_baseline"]
            lines.append(
                f"- batch {batch}: SERA / baseline = {over_baseline:.3f} (target <= {TARGETS['sera_over_baseline']}): "
                + ("met" if over_baseline <= TARGETS["sera_over_baseline"] else "missed")
            )
            if sera["ratio_to_encoders"] is not None:
                over_encoders = sera["ratio_to_encoders"]
                lines.append(
                    f"- batch {batch}: SERA / encoders alone = {over_encoders:.3f} "
                    f"(target <= {TARGETS['model_over_encoders']}): "
                    + ("met" if over_encoders <= TARGETS["model_over_encoders"] else "missed")
                )
        flops = speed["gflop_per_image"]
        lines.append(
            f"- FLOPs per image: SERA / baseline = {flops['sera'] / flops['baseline']:.3f}, "
            f"SERA / encoders = {flops['sera'] / flops['encoders']:.3f}"
        )
    memory = steps.get("memory", {}).get("results")
    if memory:
        for key in ("measured", "counted", "counted_fused_attention"):
            entries = memory.get(key) or {}
            if "peft" in entries and "full" in entries:
                ratio = entries["peft"]["peak_bytes"] / entries["full"]["peak_bytes"]
                method = entries["peft"]["method"] + (", fused attention" if key == "counted_fused_attention" else "")
                lines.append(
                    f"- memory ({method}, batch {entries['peft']['batch_size']}): PEFT / full "
                    f"fine-tuning = {ratio:.2f} (target <= {TARGETS['peft_over_full_memory']}): "
                    + ("met" if ratio <= TARGETS["peft_over_full_memory"] else "missed")
                )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A small version of everything (minutes on a CPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per benchmark (default 1).")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these steps (speed, profile, ...).")
    args = parser.parse_args()

    on_gpu = args.device.startswith("cuda")
    output_dir = BENCHMARKS / "results" / ("quick" if args.quick else "")
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])

    start = time.perf_counter()
    steps = {}
    for name, script, arguments in plan(args.quick, on_gpu):
        if args.only and name not in args.only:
            continue
        steps[name] = run_step(name, script, arguments, output_dir, extra)

    accuracy = BENCHMARKS / "accuracy_ablations.py"
    if accuracy.exists() and (not args.only or "accuracy" in args.only):
        command = [sys.executable, str(accuracy)] + (["--quick"] if args.quick else [])
        print(f"\n== accuracy: {' '.join(command[1:])}", flush=True)
        accuracy_start = time.perf_counter()
        completed = subprocess.run(command, check=False, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        (output_dir / "accuracy.md").write_text(completed.stdout)
        print(completed.stdout, flush=True)
        steps["accuracy"] = {
            "name": "accuracy",
            "command": " ".join(["python", "benchmarks/accuracy_ablations.py"] + (["--quick"] if args.quick else [])),
            "seconds": time.perf_counter() - accuracy_start,
            "returncode": completed.returncode,
            "markdown": completed.stdout,
        }

    total = time.perf_counter() - start
    summary = [f"# SERA benchmarks ({'quick' if args.quick else 'full'} run, {total / 60:.1f} minutes)", ""]
    machine = next((s["results"]["machine"] for s in steps.values() if s.get("results")), None)
    if machine:
        summary.append("Machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()))
    summary += ["", "## Targets", "", *check_targets(steps)]
    for step in steps.values():
        summary += ["", f"## {step['name']} ({step['seconds']:.0f} s)", "", f"`{step['command']}`", ""]
        summary.append(step["markdown"].strip() or f"(no output; exit code {step['returncode']})")
    (output_dir / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"\nAll done in {total / 60:.1f} minutes; summary in {output_dir / 'summary.md'}")
    failed = [name for name, step in steps.items() if step["returncode"] != 0]
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
