"""How well a frozen text tower tells apart synthref expressions that differ in one word.

For every word the generator can swap (each predicate of the location, relation and comparison templates, each
value of size, texture, colour and shape), expressions are built in pairs that differ only in that word, and the
tower's features are compared: the sentence feature SERA's neck and projector read (``text_embeds``), and the word
features at the differing tokens (what the adapters and the decoder cross-attend to). A tower that reads a word
gives its pairs a low cosine; the target for the default encoders is a sentence cosine below 0.9 for every pair.

    python benchmarks/text_probe.py --text_encoder hub_configs/sera-synthref-tiny/text_encoder --output \
        benchmarks/results/text_probe.json
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from sera_training.synthetic_expressions import TEMPLATES
from sera_training.synthetic_scenes import ATTRIBUTE_VALUES


REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TEXT_ENCODER = REPO_ROOT / "hub_configs" / "sera-synthref-tiny" / "text_encoder"
# The pairs of the issue that first measured the collapse (#12), kept so that the figures stay comparable.
NAMED_PAIRS = (
    ("the circle on the left", "the circle on the right"),
    ("the red square at the top", "the red square at the bottom"),
    ("the star above the green circle", "the star below the green circle"),
    ("the biggest blue shape", "the smallest blue shape"),
    ("the red circle", "the red square"),
    ("the red circle", "the blue circle"),
)
_TARGETS = ("circle", "red square", "big striped star", "shape")
_ANCHORS = ("green circle", "blue hexagon")


def word_pairs() -> dict[str, list[tuple[str, str]]]:
    """{field: [(expression, twin), ...]}: every pair of one field's words in the same template slots."""
    pairs = {}
    for category in ("location", "relation", "comparison"):
        predicates = [predicate for cat, predicate in TEMPLATES if cat == category]
        found = []
        for first, second in itertools.combinations(predicates, 2):
            first_templates, second_templates = TEMPLATES[(category, first)], TEMPLATES[(category, second)]
            for index in range(min(len(first_templates), len(second_templates))):
                for target in _TARGETS[:2]:
                    anchor = _ANCHORS[0]
                    found.append(
                        (
                            first_templates[index].format(target=target, anchor=anchor),
                            second_templates[index].format(target=target, anchor=anchor),
                        )
                    )
        pairs[f"{category} predicate"] = found
    for attribute, values in ATTRIBUTE_VALUES.items():
        found = []
        for first, second in itertools.combinations(values, 2):
            if attribute == "shape":
                found += [
                    (f"the {first}", f"the {second}"),
                    (f"the red {first} on the left", f"the red {second} on the left"),
                ]
            else:
                found += [
                    (f"the {first} circle", f"the {second} circle"),
                    (f"the {first} shape above the star", f"the {second} shape above the star"),
                ]
        pairs[attribute] = found
    return pairs


@torch.no_grad()
def features(model, tokenizer, texts: list[str], max_length: int):
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    outputs = model(**tokens)
    return outputs.text_embeds, outputs.last_hidden_state, tokens["input_ids"]


def pair_cosines(model, tokenizer, pairs: list[tuple[str, str]], max_length: int) -> tuple[list[float], list[float]]:
    """Sentence cosine of every pair, and the mean word-feature cosine at the tokens where the pair differs (only
    for pairs whose token sequences have the same length, so that positions correspond)."""
    first_sentence, first_words, first_ids = features(model, tokenizer, [a for a, _ in pairs], max_length)
    second_sentence, second_words, second_ids = features(model, tokenizer, [b for _, b in pairs], max_length)
    sentence = F.cosine_similarity(first_sentence, second_sentence, dim=-1).tolist()
    word = []
    for index in range(len(pairs)):
        if (first_ids[index] == tokenizer.pad_token_id).sum() != (second_ids[index] == tokenizer.pad_token_id).sum():
            continue
        differing = first_ids[index] != second_ids[index]
        if differing.any():
            word.append(
                float(
                    F.cosine_similarity(first_words[index][differing], second_words[index][differing], dim=-1).mean()
                )
            )
    return sentence, word


def probe(text_encoder: str | Path, max_length: int = 16) -> dict:
    model = CLIPTextModelWithProjection.from_pretrained(text_encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_encoder)
    result = {"text_encoder": str(text_encoder), "fields": {}, "named_pairs": []}
    for field, pairs in word_pairs().items():
        sentence, word = pair_cosines(model, tokenizer, pairs, max_length)
        worst = max(range(len(pairs)), key=lambda i: sentence[i])
        result["fields"][field] = {
            "pairs": len(pairs),
            "sentence_cosine_mean": sum(sentence) / len(sentence),
            "sentence_cosine_max": max(sentence),
            "pairs_over_0.9": sum(value > 0.9 for value in sentence),
            "word_cosine_mean": sum(word) / len(word) if word else None,
            "hardest_pair": list(pairs[worst]),
        }
    sentence, _ = pair_cosines(model, tokenizer, list(NAMED_PAIRS), max_length)
    for (first, second), value in zip(NAMED_PAIRS, sentence):
        _, word = pair_cosines(model, tokenizer, [(first, second)], max_length)
        result["named_pairs"].append(
            {"pair": [first, second], "sentence_cosine": value, "word_cosine": word[0] if word else None}
        )
    return result


def to_markdown(results: list[dict]) -> str:
    lines = [
        "| field | pairs | "
        + " | ".join(f"max / mean sentence cos, word cos ({r['label']})" for r in results)
        + " | pairs > 0.9 |",
        "|---|---:|" + "---:|" * len(results) + "---:|",
    ]
    for field in results[0]["fields"]:
        cells = []
        for result in results:
            entry = result["fields"][field]
            word = f"{entry['word_cosine_mean']:.3f}" if entry["word_cosine_mean"] is not None else "-"
            cells.append(f"{entry['sentence_cosine_max']:.3f} / {entry['sentence_cosine_mean']:.3f}, {word}")
        over = " / ".join(str(result["fields"][field]["pairs_over_0.9"]) for result in results)
        lines.append(f"| {field} | {results[0]['fields'][field]['pairs']} | " + " | ".join(cells) + f" | {over} |")
    lines += [
        "",
        "| pair | " + " | ".join(f"sentence, word ({r['label']})" for r in results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for index, entry in enumerate(results[0]["named_pairs"]):
        cells = []
        for result in results:
            named = result["named_pairs"][index]
            word = f"{named['word_cosine']:.3f}" if named["word_cosine"] is not None else "-"
            cells.append(f"{named['sentence_cosine']:.3f}, {word}")
        lines.append(f"| {entry['pair'][0]} / {entry['pair'][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--text_encoder", nargs="+", default=[str(DEFAULT_TEXT_ENCODER)], help="one or more text_encoder folders"
    )
    parser.add_argument("--labels", nargs="+", help="a column name per text encoder")
    parser.add_argument("--output", help="write the results here (.json, and .md next to it)")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(path).parent.name for path in args.text_encoder]
    results = [{"label": label, **probe(path)} for label, path in zip(labels, args.text_encoder)]
    table = to_markdown(results)
    print(table)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        output.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
