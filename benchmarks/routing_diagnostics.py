"""How much do a trained SERA's modules change the features, and can its routers tell expressions apart?

    python benchmarks/routing_diagnostics.py outputs/sera-synthref-tiny [--split test] [--num-samples 512]

For a trained model folder, on one split of the data it was trained on (read from its `training_recipe.json`):
- SERA-Adapter, per adapted block: |scale * adapter(x)| / |mlp(x)|, the size of what the adapter adds to the block's
  frozen MLP output (root mean square over tokens and channels).
- SERA-Fusion, per level: |Y - X| / |X| over the whole fused level, and for each expert |expert(X) - X| / |X|.
- Routers: the spread of the clean router logits across samples (std per expert, mean over experts) next to the
  training noise std, and how far the per-category mean weights are from the overall mean (the largest gap). A router
  whose logits vary less than its noise picks experts at random while training; one whose weights do not move
  with the category does not route by expression.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from accuracy_ablations import recipe_split  # benchmarks/ is first on sys.path when this script runs
from benchmark_utils import markdown_table

from modeling_sera import SeraForReferringSegmentation, SeraProcessor
from modeling_sera.sera_adapter import ADAPTER_EXPERT_NAMES, SeraAdaptedMLP
from modeling_sera.sera_fusion import FUSION_EXPERT_NAMES, SeraFusion


REPO_ROOT = Path(__file__).resolve().parents[1]


def rms(tensor: torch.Tensor) -> float:
    return tensor.float().pow(2).mean().sqrt().item()


def collect(model, processor, dataset, batch_size: int) -> dict:
    ratios = defaultdict(list)
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SeraAdaptedMLP):

            def adapter_hook(module, inputs, output, name=name):
                base = module.base_layer(inputs[0])
                ratios[f"adapter {name.split('.layer.')[-1].split('.')[0]}"].append(rms(output - base) / rms(base))

            hooks.append(module.register_forward_hook(adapter_hook))
        elif isinstance(module, SeraFusion):

            def fusion_hook(module, inputs, output, name=name):
                grid = inputs[0]
                fused = output[0] if isinstance(output, tuple) else output
                level = name.split(".")[-1]
                ratios[f"fusion level {level}: fused output"].append(rms(fused - grid) / rms(grid))
                for expert_name in FUSION_EXPERT_NAMES:
                    expert = module.experts[expert_name]
                    ratios[f"fusion level {level}: {expert_name} expert"].append(rms(expert(grid) - grid) / rms(grid))

            hooks.append(module.register_forward_hook(fusion_hook))

    logits_by_level = defaultdict(list)
    weights_by_category = defaultdict(lambda: defaultdict(list))
    with torch.inference_mode():
        for rows in dataset.iter(batch_size=batch_size):
            inputs = processor(
                images=[i.convert("RGB") for i in rows["image"]], text=rows["expression"], return_tensors="pt"
            )
            outputs = model(
                pixel_values=inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
            )
            for level, logits in enumerate(outputs.fusion_router_logits or ()):
                logits_by_level[level].append(logits.float())
            fusion = (
                torch.stack(outputs.fusion_router_weights).float().mean(0) if outputs.fusion_router_weights else None
            )
            # One weight vector per sample and router kind: the fusion routers averaged over levels, the adapter
            # routers over adapted blocks and tokens.
            adapter = [w for w in outputs.adapter_router_weights or () if w is not None]
            adapter = (
                torch.stack([w.float().reshape(len(w), -1, w.shape[-1]).mean(1) for w in adapter]).mean(0)
                if adapter
                else None
            )
            for index, category in enumerate(rows["category"]):
                if fusion is not None:
                    weights_by_category[category]["fusion"].append(fusion[index])
                if adapter is not None:
                    weights_by_category[category]["adapter"].append(adapter[index])
    for hook in hooks:
        hook.remove()
    return {"ratios": ratios, "logits": logits_by_level, "weights": weights_by_category}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a trained model folder (train.py's output)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    model = SeraForReferringSegmentation.from_pretrained(args.model).eval()
    processor = SeraProcessor.from_pretrained(args.model)
    recipe = json.loads((Path(args.model) / "training_recipe.json").read_text())
    dataset = recipe_split(recipe, args.split)
    dataset = dataset.shuffle(seed=0).select(range(min(args.num_samples, len(dataset))))
    found = collect(model, processor, dataset, args.batch_size)

    rows = [[name, f"{sum(values) / len(values):.3f}"] for name, values in found["ratios"].items()]
    print(f"# {args.model}, {len(dataset)} {args.split} expressions\n")
    print("What each SERA module adds, relative to what it is added to (RMS ratio):\n")
    print(markdown_table(["module", "|added| / |input|"], rows))

    report = {"ratios": {name: sum(v) / len(v) for name, v in found["ratios"].items()}, "routers": {}}
    if found["logits"]:
        noise = model.config.fusion_router_noise_std
        router_rows = []
        for level, chunks in found["logits"].items():
            logits = torch.cat(chunks)
            spread = logits.std(0).mean().item()
            router_rows.append([str(level), f"{spread:.3f}", f"{noise:g}", f"{logits.mean(0).tolist()}"])
            report["routers"][level] = {"logit_std_across_samples": spread, "mean_logits": logits.mean(0).tolist()}
        print("\nSERA-Fusion routers: clean logits across samples, against the training noise:\n")
        print(markdown_table(["level", "logit std across samples", "noise std", "mean logits"], router_rows))
        overall = torch.stack([w for c in found["weights"].values() for w in c["fusion"]]).mean(0)
        gap_rows = []
        for category, values in sorted(found["weights"].items()):
            mean = torch.stack(values["fusion"]).mean(0)
            gap_rows.append([category, len(values["fusion"]), f"{(mean - overall).abs().max().item():.4f}"])
        print("\nPer-category mean fusion weights against the overall mean (largest absolute gap over experts):\n")
        print(markdown_table(["category", "samples", "largest gap"], gap_rows))
        report["category_gaps"] = {row[0]: float(row[2]) for row in gap_rows}
    report["mean_weights_by_category"] = {}
    for kind, names in (("fusion", FUSION_EXPERT_NAMES), ("adapter", ADAPTER_EXPERT_NAMES)):
        table = {
            category: torch.stack(values[kind]).mean(0).tolist()
            for category, values in sorted(found["weights"].items())
            if values.get(kind)
        }
        if not table:
            continue
        report["mean_weights_by_category"][kind] = {"experts": list(names), **table}
        print(f"\nMean {kind} router weight per expert, by category:\n")
        rows = [[category, *(f"{w:.3f}" for w in weights)] for category, weights in table.items()]
        print(markdown_table(["category", *names], rows))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
