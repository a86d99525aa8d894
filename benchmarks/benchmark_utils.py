"""Shared pieces of the SERA benchmarks: the machine, the model variants, inputs, interleaved timing and tables.

Every timing here is taken the same way: the variants being compared are built once in one process and then timed in
interleaved rounds (A B C, then B C A, ...), so that a slow spell of a shared machine hits every variant alike; each
figure is reported as the median over rounds of its ratio to the round's baseline.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_sera import SeraConfig, SeraForReferringSegmentation  # noqa: E402 (after HF_HUB_OFFLINE is set)


REAL_SIZE_CONFIG = REPO_ROOT / "hub_configs" / "sera-refcoco"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# The ablation switches of the paper's Table 4, as SeraConfig overrides.
VARIANTS = {
    "baseline": {"use_sera_adapter": False, "use_sera_fusion": False},
    "adapter": {"use_sera_adapter": True, "use_sera_fusion": False},
    "sera": {"use_sera_adapter": True, "use_sera_fusion": True},
}
VARIANT_NAMES = {
    "encoders": "frozen encoders alone",
    "baseline": "baseline (no SERA modules)",
    "adapter": "+ SERA-Adapter",
    "sera": "SERA (Adapter + Fusion, top-4)",
}


def add_common_arguments(parser) -> None:
    parser.add_argument("--config", default=str(REAL_SIZE_CONFIG), help="SeraConfig folder (default: real size).")
    parser.add_argument("--image-size", type=int, default=None, help="Override the processor's input size.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: 1 on CPU: on a shared 2-core machine a second thread waits on the busy core).",
    )
    parser.add_argument("--output", default=None, help="Write the results as JSON here.")


def setup_threads(device: str, threads: int | None) -> None:
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    elif threads:
        torch.set_num_threads(threads)


def load_config(config_path: str | Path, **overrides) -> SeraConfig:
    return SeraConfig.from_pretrained(config_path, **overrides)


def input_sizes(config_path: str | Path, image_size: int | None = None) -> tuple[int, int]:
    """Letterbox side and tokens per expression of the folder's processor, where the sizes live (`image_size`
    overrides the side). A folder without one (the real-size configs, whose processor training builds from the
    encoders) gets the processor's defaults, which are the paper's: 448 and 17."""
    path = Path(config_path) / "processor_config.json"
    processor = json.loads(path.read_text()) if path.is_file() else {}
    side = processor.get("image_processor", {}).get("size", {}).get("height", 448)
    return image_size or side, processor.get("max_text_length", 17)


def build_model(
    config_path: str | Path,
    variant: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
) -> SeraForReferringSegmentation:
    """A randomly initialised model of one variant (random weights time exactly like trained ones)."""
    torch.manual_seed(seed)
    config = load_config(config_path, **VARIANTS[variant], **overrides)
    config._attn_implementation = "sdpa"
    if device == "meta":  # no memory, no initialisation: for counting FLOPs and memory
        with torch.device("meta"):
            return SeraForReferringSegmentation(config).to(dtype)
    model = SeraForReferringSegmentation(config)
    return model.to(device=device, dtype=dtype)


def make_inputs(
    config: SeraConfig,
    sizes: tuple[int, int],
    batch_size: int,
    device: str = "cpu",
    seed: int = 0,
    labels: bool = False,
):
    """Random inputs shaped like SeraProcessor's output at `sizes` (`input_sizes`); expressions of varied length, so
    padding is masked."""
    generator = torch.Generator().manual_seed(seed)
    size, length = sizes
    vocab = config.text_config.vocab_size
    input_ids = torch.randint(2, vocab - 2, (batch_size, length), generator=generator)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        used = max(3, length - 2 * row % (length - 2))
        input_ids[row, used - 1] = config.text_config.eos_token_id
        input_ids[row, used:] = config.text_config.pad_token_id
        attention_mask[row, :used] = 1
    inputs = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }
    if labels:
        inputs["labels"] = (torch.rand(batch_size, size, size, generator=generator) > 0.7).float()
    return {key: value.to(device) for key, value in inputs.items()}


def encoders_forward(model: SeraForReferringSegmentation, inputs: dict) -> torch.Tensor:
    """The two encoders as SERA calls them (vision tower with every hidden state kept), nothing else.

    Only meaningful on a model without SERA-Adapters: with adapters, the vision blocks need the words.
    """
    inner = model.model
    text = inner.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    pixel_values = inputs["pixel_values"].to(inner.dtype)
    vision = inner.vision_model(pixel_values=pixel_values, output_hidden_states=True)
    return vision.last_hidden_state, text.text_embeds


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_timing(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, in `repeats` rounds; the order rotates each round (A B C, B C A, ...)."""
    names = list(functions)
    for _ in range(warmup):
        for name in names:
            functions[name]()
            synchronize(device)
    seconds = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            functions[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
        if log is not None:
            log(f"  round {round_index + 1}/{repeats}: " + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in names))
    return seconds


def ratio_summary(seconds: dict[str, list[float]], reference: str) -> dict[str, dict]:
    """Median seconds, and the median and spread over rounds of each variant's ratio to the same round's reference."""
    summary = {}
    for name, values in seconds.items():
        ratios = [value / base for value, base in zip(values, seconds[reference])]
        summary[name] = {
            "median_s": statistics.median(values),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds": len(values),
        }
    return summary


def autocast_context(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def machine_info(device: str = "cpu") -> dict:
    """What a reader needs to reproduce or discount a timing: processor, cores, accelerator, library versions, date."""
    import transformers

    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def _cpu_model_name() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    separators = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(separators) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
