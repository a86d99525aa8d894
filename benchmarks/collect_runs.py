"""Tables of validation curves and test scores from training runs' `eval_results.json`, for BENCHMARKS.md.

    python benchmarks/collect_runs.py --run "SERA, 1500 steps=/tmp/runs/C" --run "baseline=/tmp/runs/E" \
        --output benchmarks/results/learning_curves.json

Each run is a model folder written by `training/train.py` (its `eval_results.json` holds the validation history and
the test scores); the command that made it goes with the table in BENCHMARKS.md. The JSON written here keeps every
figure of those files, so the tables can be checked against them.
"""

import argparse
import json
from pathlib import Path

from benchmark_utils import markdown_table


CATEGORIES = ("attribute", "location", "relation", "comparison")


def load_run(folder: Path) -> dict:
    results = json.loads((folder / "eval_results.json").read_text())
    return {
        "validation": results["validation"]["history"],
        "test": results["splits"],
        "train": results["train"],
        "recipe": results["recipe"],
    }


def curve_table(runs: dict) -> str:
    steps = sorted({entry["step"] for run in runs.values() for entry in run["validation"]})
    rows = []
    for name, run in runs.items():
        by_step = {entry["step"]: entry["mIoU"] for entry in run["validation"]}
        rows.append([name, *(f"{by_step[step]:.1f}" if step in by_step else "" for step in steps)])
    return markdown_table(["run (validation mIoU)", *(f"step {step}" for step in steps)], rows)


def test_table(runs: dict) -> str:
    rows = []
    for name, run in runs.items():
        test, unseen = run["test"]["test"], run["test"].get("test_unseen", {})
        per_category = test.get("per_category", {})
        rows.append(
            [
                name,
                f"{test['mIoU']:.2f}",
                f"{test['oIoU']:.2f}",
                f"{test['Prec@0.5']:.2f}",
                *(f"{per_category[c]['mIoU']:.1f}" if c in per_category else "" for c in CATEGORIES),
                f"{unseen['mIoU']:.2f}" if unseen else "",
            ]
        )
    header = ["run", "test mIoU", "test oIoU", "test Prec@0.5", *CATEGORIES, "test_unseen mIoU"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=FOLDER, repeatable")
    parser.add_argument("--output")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        name, folder = item.split("=", 1)
        runs[name] = load_run(Path(folder))
    tables = {"curves": curve_table(runs), "test": test_table(runs)}
    print(tables["curves"], tables["test"], sep="\n\n")
    if args.output:
        Path(args.output).write_text(json.dumps({"runs": runs, "tables": tables}, indent=2) + "\n")


if __name__ == "__main__":
    main()
