"""The paper's ablations on the built-in data: every variant trained with the same recipe and budget, several seeds.

    python benchmarks/accuracy_ablations.py                 # 7 variants x 3 seeds, the default recipe
    python benchmarks/accuracy_ablations.py --quick         # 3 variants x 1 seed, 30 steps on a small split
    python benchmarks/accuracy_ablations.py --jobs 7        # runs side by side (a GPU has room for many)
    python benchmarks/accuracy_ablations.py --learning_rate 5e-4   # unknown options go to every training/train.py

Variants (SeraConfig overrides on top of the recipe's config, `hub_configs/sera-synthref-tiny` by default):
baseline (no SERA modules), + SERA-Adapter, + SERA-Adapter + SERA-Fusion with top-K 1..4 (the config's K is the full
SERA), and SERA without the MoE regularizers (balance, z and entropy losses at weight 0). With `--only
sentence_router`, also a variant that is not the paper's: SERA whose fusion routers read the sentence feature too
(`fusion_router_sentence=True`).

Each run is a `training/train.py` process (its own output folder under `--output_dir`); its `eval_results.json` gives
mIoU and oIoU (overall, per expression category, on the unseen-combination split). After training, each run with
routers is read again on the test split to count how each expert is used per expression category. Seeds are
aggregated as mean +- sample standard deviation (n-1). Finished runs are reused, so an interrupted sweep picks up
where it stopped (a run is redone when its command, config or recipe changed).
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
DEFAULT_CONFIG = REPO_ROOT / "hub_configs" / "sera-synthref-tiny"
CATEGORIES = ("attribute", "location", "relation", "comparison")
EXTRA_VARIANTS = ("sentence_router",)  # beyond the paper's ablations: only with --only
NO_REGULARIZERS = {"router_balance_loss_weight": 0.0, "router_z_loss_weight": 0.0, "router_entropy_loss_weight": 0.0}

QUICK_TRAIN_ARGS = [
    "--max_train_steps", "30",
    "--synthetic_num_images", "train=96,validation=16,test=32,test_unseen=32",
    "--eval_steps", "none",
    "--max_validation_samples", "32",
    "--checkpointing_steps", "none",
    "--final_weights", "last",
]  # fmt: skip


def variants(config_top_k: int, quick: bool) -> list[tuple[str, str, dict]]:
    """(name, label, SeraConfig overrides) of every row."""
    rows = [
        ("baseline", "baseline (no SERA modules)", {"use_sera_adapter": False, "use_sera_fusion": False}),
        ("adapter", "+ SERA-Adapter", {"use_sera_adapter": True, "use_sera_fusion": False}),
    ]
    for top_k in range(1, 5):
        label = f"+ SERA-Adapter + SERA-Fusion, top-{top_k}" + (" (SERA)" if top_k == config_top_k else "")
        rows.append((f"top{top_k}", label, {"use_sera_adapter": True, "use_sera_fusion": True, "fusion_top_k": top_k}))
    rows.append(("no_regularizers", f"SERA (top-{config_top_k}) without the MoE regularizers", NO_REGULARIZERS))
    # Not a row of the paper (run it with --only): its fusion router reads only the image level, so it cannot
    # route by expression; this one also reads the sentence feature.
    rows.append(
        (
            "sentence_router",
            f"SERA (top-{config_top_k}) with sentence-aware fusion routers [ours]",
            {"use_sera_adapter": True, "use_sera_fusion": True, "fusion_router_sentence": True},
        )
    )
    if quick:
        keep = {"baseline", "adapter", f"top{config_top_k}"}
        rows = [row for row in rows if row[0] in keep]
    return rows


def overrides_string(overrides: dict) -> str:
    """`PretrainedConfig.update_from_string` syntax, which `train.py --config_overrides` reads."""
    return ",".join(
        f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in overrides.items()
    )


# ----------------------------------------------------------------------------------------------------------------------
# One run


def run_one(name: str, overrides: dict, seed: int, args, train_args: list[str]) -> dict:
    """Train (unless already done), then count routing; returns the run's record."""
    run_dir = Path(args.output_dir) / name / f"seed{seed}"
    log_path = run_dir.parent / f"seed{seed}.log"
    results_path = run_dir / "eval_results.json"
    fingerprint_path = run_dir.parent / f"seed{seed}.fingerprint"
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(run_dir), "--seed", str(seed)]
    command += ["--report_to", "none", "--no_progress_bar", "--cpu_threads", str(args.threads), *train_args]
    if overrides:
        command += ["--config_overrides", overrides_string(overrides)]
    fingerprint = run_fingerprint(command, args.config_name)
    reusable = results_path.exists() and fingerprint_path.exists() and fingerprint_path.read_text() == fingerprint
    if not reusable:
        # A finished run is reused only if it ran this very command on this very config and recipe.
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            log.write(shlex.join(command) + "\n")
            log.flush()
            completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)
        print(
            f"  {name} seed {seed}: exit {completed.returncode} after {time.perf_counter() - start:.0f} s", flush=True
        )
        if completed.returncode != 0:
            return {
                "name": name,
                "seed": seed,
                "error": f"train.py exited with {completed.returncode}; see {log_path}",
            }
        fingerprint_path.write_text(fingerprint)
    record = {"name": name, "seed": seed, **json.loads(results_path.read_text())}

    routing_path = run_dir / "routing.json"
    has_routers = overrides.get("use_sera_adapter", True) or overrides.get("use_sera_fusion", True)
    if has_routers and not routing_path.exists():
        command = [sys.executable, __file__, "--routing_of", str(run_dir), "--routing_output", str(routing_path)]
        command += ["--threads", str(args.threads)]
        with open(log_path, "a") as log:
            subprocess.run(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)
    if routing_path.exists():
        record["routing"] = json.loads(routing_path.read_text())
    return record


def run_fingerprint(command: list[str], config_name: str) -> str:
    """The command (interpreter aside) and the contents of the config and recipe it trains from."""
    digest = hashlib.sha256(json.dumps(command[1:]).encode())
    for name in ("config.json", "training_recipe.json"):
        path = Path(config_name) / name
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def routing_statistics(model_dir: str, split: str = "test", batch_size: int = 64) -> dict:
    """Mean router weight and how often each expert is selected, per expression category, on one split."""
    from modeling_sera import SeraForReferringSegmentation, SeraProcessor
    from modeling_sera.pipeline_sera import ADAPTER_EXPERT_NAMES, FUSION_EXPERT_NAMES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SeraForReferringSegmentation.from_pretrained(model_dir).to(device).eval()
    processor = SeraProcessor.from_pretrained(model_dir)
    dataset = recipe_split(json.loads((Path(model_dir) / "training_recipe.json").read_text()), split)
    sums = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(int)
    with torch.inference_mode():
        for rows in dataset.iter(batch_size=batch_size):
            images = [image.convert("RGB") for image in rows["image"]]
            inputs = processor(images=images, text=rows["expression"], return_tensors="pt")
            outputs = model(
                pixel_values=inputs["pixel_values"].to(device),
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device),
            )
            per_sample = {}
            if outputs.fusion_router_weights:
                fusion = torch.stack(outputs.fusion_router_weights).float()  # (levels, batch, experts)
                per_sample["fusion_weight"] = (fusion.mean(0), FUSION_EXPERT_NAMES)
                per_sample["fusion_selected"] = ((fusion > 0).float().mean(0), FUSION_EXPERT_NAMES)
            if outputs.adapter_router_weights:
                adapter = torch.stack(outputs.adapter_router_weights).float()
                per_sample["adapter_weight"] = (adapter.mean(0), ADAPTER_EXPERT_NAMES)
            for index, category in enumerate(rows["category"]):
                for group in (category, "all"):
                    counts[group] += 1
                    for statistic, (values, names) in per_sample.items():
                        for expert, value in zip(names, values[index].tolist()):
                            sums[group][f"{statistic}/{expert}"] += value
    return {
        group: {"num_samples": counts[group], **{key: value / counts[group] for key, value in sums[group].items()}}
        for group in counts
    }


def recipe_split(recipe: dict, split: str):
    """The split the run was scored on (the synthetic data at the size and seed it was trained with)."""
    from sera_training.data_sources import load_source_splits

    synthetic = {"cache_dir": recipe["synthetic_cache_dir"], "seed": recipe["synthetic_seed"]}
    splits = load_source_splits(recipe["dataset"], [split], num_images=recipe["synthetic_num_images"], **synthetic)
    return splits[split]


# ----------------------------------------------------------------------------------------------------------------------
# Tables


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def split_metric(record: dict, split: str, metric: str, category: str | None = None):
    results = record.get("splits", {}).get(split)
    if results is None:
        return None
    if category is not None:
        results = (results.get("per_category") or {}).get(category)
        if results is None:
            return None
    return results.get(metric)


def tables(rows: list[tuple[str, str, dict]], records: list[dict], config_top_k: int) -> str:
    by_variant = defaultdict(list)
    for record in records:
        if "error" not in record:
            by_variant[record["name"]].append(record)
    baseline_miou = [split_metric(r, "test", "mIoU") for r in by_variant.get("baseline", [])]
    baseline_mean = statistics.mean(baseline_miou) if baseline_miou else None

    def values(name, split, metric, category=None):
        found = [split_metric(r, split, metric, category) for r in by_variant.get(name, [])]
        return [value for value in found if value is not None]

    out = ["| variant | seeds | test mIoU | test oIoU | Δ mIoU vs baseline | unseen mIoU | unseen oIoU |"]
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, _ in rows:
        miou = values(name, "test", "mIoU")
        delta = f"{statistics.mean(miou) - baseline_mean:+.1f}" if miou and baseline_mean is not None else "–"
        out.append(
            f"| {label} | {len(by_variant.get(name, []))} | {mean_std(miou)} | {mean_std(values(name, 'test', 'oIoU'))}"
            f" | {delta} | {mean_std(values(name, 'test_unseen', 'mIoU'))} "
            f"| {mean_std(values(name, 'test_unseen', 'oIoU'))} |"
        )

    out += ["", "Test mIoU per expression category:", ""]
    out.append("| variant | " + " | ".join(CATEGORIES) + " |")
    out.append("| --- |" + " ---: |" * len(CATEGORIES))
    for name, label, _ in rows:
        cells = [mean_std(values(name, "test", "mIoU", category)) for category in CATEGORIES]
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    sera_runs = [r for r in by_variant.get(f"top{config_top_k}", []) if r.get("routing")]
    if sera_runs:
        out += ["", f"Routing of SERA (top-{config_top_k}) on the test split, mean over seeds and fused levels:", ""]
        fusion_experts = ("spatial", "context", "boundary", "shape")
        out.append(
            "| category | "
            + " | ".join(f"Fusion {e} weight (selected)" for e in fusion_experts)
            + " | Adapter spatial | Adapter boundary |"
        )
        out.append("| --- |" + " ---: |" * (len(fusion_experts) + 2))
        for category in (*CATEGORIES, "all"):
            groups = [r["routing"][category] for r in sera_runs if category in r["routing"]]
            if not groups:
                continue

            def average(key, groups=groups):
                found = [group[key] for group in groups if key in group]
                return statistics.mean(found) if found else float("nan")

            cells = [
                f"{average(f'fusion_weight/{e}'):.3f} ({100 * average(f'fusion_selected/{e}'):.0f}%)"
                for e in fusion_experts
            ]
            cells += [f"{average(f'adapter_weight/{e}'):.3f}" for e in ("spatial", "boundary")]
            out.append(f"| {category} | " + " | ".join(cells) + " |")
    errors = [r for r in records if "error" in r]
    if errors:
        out += ["", "Failed runs:", *[f"- {r['name']} seed {r['seed']}: {r['error']}" for r in errors]]
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 variants, 1 seed, 30 steps on a small split.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Default: 0 1 2 (quick: 0).")
    parser.add_argument("--only", nargs="+", default=None, help="Run only these variants (baseline, top4, ...).")
    parser.add_argument("--jobs", type=int, default=None, help="Runs side by side (default: 2 on CPU, 7 on a GPU).")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per run.")
    parser.add_argument("--config_name", default=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--output_dir", default=None, help="Default: outputs/ablations (quick: outputs/ablations-quick)."
    )
    parser.add_argument("--results", default=None, help="JSON of all runs (default: benchmarks/results/...).")
    parser.add_argument("--routing_of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--routing_output", default=None, help=argparse.SUPPRESS)
    args, train_args = parser.parse_known_args()

    if args.routing_of:
        torch.set_num_threads(args.threads)
        Path(args.routing_output).write_text(json.dumps(routing_statistics(args.routing_of), indent=2) + "\n")
        return

    from modeling_sera import SeraConfig

    config_top_k = SeraConfig.from_pretrained(args.config_name).fusion_top_k
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    on_gpu = torch.cuda.is_available()
    jobs = args.jobs or (7 if on_gpu else 2)
    args.output_dir = args.output_dir or str(
        REPO_ROOT / "outputs" / ("ablations-quick" if args.quick else "ablations")
    )
    train_args = ["--config_name", args.config_name, *(QUICK_TRAIN_ARGS if args.quick else []), *train_args]
    rows = [
        row
        for row in variants(config_top_k, args.quick)
        if (row[0] in args.only if args.only else row[0] not in EXTRA_VARIANTS)
    ]

    # Build the data once, before runs race to build it side by side: a run's recipe says which.
    from sera_training.arguments import parse_args, recipe_of

    recipe = recipe_of(parse_args(["--output_dir", args.output_dir, *train_args]))
    if recipe["dataset"] == "synthref":  # one build writes every split; other sources are only read
        recipe_split(recipe, recipe["train_split"])

    print(
        f"{len(rows)} variants x {len(seeds)} seeds, {jobs} at a time, {args.threads} thread(s) each, "
        f"{'GPU ' + torch.cuda.get_device_name() if on_gpu else 'CPU'}; train.py {shlex.join(train_args)}",
        flush=True,
    )
    start = time.perf_counter()
    work = [(name, overrides, seed) for seed in seeds for name, _, overrides in rows]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        records = list(pool.map(lambda item: run_one(*item, args, train_args), work))
    minutes = (time.perf_counter() - start) / 60

    table = tables(rows, records, config_top_k)
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"\nAccuracy ablations on synthref ({len(seeds)} seed(s), {minutes:.1f} min on {device}), scores in %\n")
    print(table)
    results_path = (
        Path(args.results)
        if args.results
        else REPO_ROOT / "benchmarks" / "results" / ("quick/accuracy.json" if args.quick else "accuracy.json")
    )
    results_path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"train_args": train_args, "seeds": seeds, "device": device, "minutes": minutes, "runs": records}
    results_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if any("error" in record for record in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
