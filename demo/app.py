"""SERA referring image segmentation demo (Gradio), in the Hugging Face Space layout.

    SERA_MODEL=org/sera-refcoco python demo/app.py         # or a folder written by save_pretrained
    SERA_MODEL_REVISION=<commit> ...                       # optional, with a Hub repo id

Upload a picture (or pick the example), type one expression per line and press Segment: every expression gets its
mask tinted over the image with its outline, its score and the routing weights of both SERA stages (SERA-Fusion,
averaged over levels; SERA-Adapter, averaged over blocks). With no SERA_MODEL the model of the default run,
``outputs/sera-synthref-tiny``, is used when it is there.

The model is loaded with this package's code when it is installed (``modeling_sera.cli.load_segmenter``, as
``sera-predict`` does), else with ``transformers.pipeline(..., trust_remote_code=True)`` from the checkpoint's own
remote code, which is what happens on a Space.
"""

import os
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image, ImageChops, ImageFilter


HERE = Path(__file__).resolve().parent
TASK = "referring-image-segmentation"
DEFAULT_MODEL = "outputs/sera-synthref-tiny"
EXAMPLE_IMAGE = HERE / "examples" / "scene.png"
FUSION_EXPERTS = ("spatial", "context", "boundary", "shape")
ADAPTER_EXPERTS = ("spatial", "boundary")
COLUMNS = (
    ["expression", "score", "mask %"]
    + [f"fusion {name}" for name in FUSION_EXPERTS]
    + [f"adapter {name}" for name in ADAPTER_EXPERTS]
)
COLORS = ((0, 150, 255), (255, 90, 40), (40, 200, 90), (200, 60, 220), (255, 200, 0), (0, 200, 200))
TINT_OPACITY = 0.45
MAX_EXPRESSIONS = 8


def resolve_model() -> str:
    """SERA_MODEL, else the default run's folder (next to the working directory or the repository) when present."""
    model = os.environ.get("SERA_MODEL")
    if model:
        return model
    for candidate in (Path(DEFAULT_MODEL), HERE.parent / DEFAULT_MODEL):
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise SystemExit(
        f"demo/app.py: error: no model. Set SERA_MODEL to a Hub repo id or a folder written by save_pretrained, or "
        f"run the default training (bash scripts/run_default.sh) to write {DEFAULT_MODEL}."
    )


def load_segmenter(model: str, revision: str | None = None):
    try:
        from modeling_sera.cli import ModelSourceError
        from modeling_sera.cli import load_segmenter as load_with_package
    except ImportError:  # on a Space: the checkpoint's own remote code
        from transformers import pipeline

        return pipeline(TASK, model=model, revision=revision, trust_remote_code=True)
    try:
        return load_with_package(model, revision=revision)
    except ModelSourceError as error:
        raise SystemExit(f"demo/app.py: error: {error}") from None


def parse_expressions(text: str) -> list[str]:
    expressions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not expressions:
        raise gr.Error('Type an expression, e.g. "the red circle" (one per line for several).')
    if len(expressions) > MAX_EXPRESSIONS:
        raise gr.Error(f"At most {MAX_EXPRESSIONS} expressions at once, got {len(expressions)}.")
    return expressions


def draw_overlay(image: Image.Image, masks: list[np.ndarray]) -> Image.Image:
    """Each mask tinted over the image in its own colour, with its outline in the same colour."""
    picture = image.convert("RGB")
    for index, mask in enumerate(masks):
        color = COLORS[index % len(COLORS)]
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
        tinted = Image.blend(picture, Image.new("RGB", picture.size, color), TINT_OPACITY)
        picture = Image.composite(tinted, picture, mask_image)
        padded = mask_image.filter(ImageFilter.MaxFilter(3))
        outline = ImageChops.difference(padded, mask_image.filter(ImageFilter.MinFilter(3)))
        picture.paste(color, mask=outline)
    return picture


def segment(segmenter, image, text: str, threshold: float):
    """What the Segment button does: (overlay, [(mask, expression)], table rows)."""
    if image is None:
        raise gr.Error("Upload an image or pick the example first.")
    expressions = parse_expressions(text)
    image = image.convert("RGB")
    if min(image.size) < 2:
        raise gr.Error(f"The image is {image.width}x{image.height} pixels: SERA needs at least 2 on each side.")
    results = segmenter(image, expressions, threshold=threshold, return_router_weights=True)
    masks = [np.asarray(result["mask"]) > 0 for result in results]
    rows = []
    for expression, result, mask in zip(expressions, results, masks):
        weights = result["router_weights"]
        rows.append(
            [expression, round(result["score"], 4), round(100 * float(mask.mean()), 2)]
            + [round(weights["fusion"].get(name, 0.0), 3) for name in FUSION_EXPERTS]
            + [round(weights["adapter"].get(name, 0.0), 3) for name in ADAPTER_EXPERTS]
        )
    gallery = [(result["mask"], expression) for expression, result in zip(expressions, results)]
    return draw_overlay(image, masks), gallery, rows


def build_demo(segmenter, model_name: str = "") -> gr.Blocks:
    threshold = float(getattr(segmenter.processor, "mask_threshold", 0.35) or 0.35)
    with gr.Blocks(title="SERA referring image segmentation") as demo:
        gr.Markdown(
            "# SERA: referring image segmentation\n"
            "Upload an image, type what to segment (one expression per line for several) and press **Segment**. "
            "Each expression gets its mask (tinted, outlined), its score (mean foreground probability inside the "
            "mask) and the routing weights of SERA-Fusion (mean over levels) and SERA-Adapter (mean over blocks)."
            + (f"\n\nModel: `{model_name}`" if model_name else "")
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="pil", image_mode="RGB", height=360, elem_id="input-image")
                expressions = gr.Textbox(
                    label="expressions (one per line)", lines=3, placeholder="the red circle", elem_id="expressions"
                )
                threshold_slider = gr.Slider(0.0, 1.0, value=threshold, step=0.01, label="mask threshold")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if EXAMPLE_IMAGE.is_file():
                    gr.Examples([[str(EXAMPLE_IMAGE), "the big red shape"]], inputs=[image, expressions])
            with gr.Column():
                overlay = gr.Image(
                    label="masks over the image", type="pil", format="png", height=360, elem_id="overlay"
                )
                masks = gr.Gallery(label="masks", format="png", columns=4, height="auto", elem_id="masks")
        table = gr.Dataframe(headers=COLUMNS, label="score and routing weights", elem_id="routing", wrap=True)
        button.click(
            lambda *inputs: segment(segmenter, *inputs),
            inputs=[image, expressions, threshold_slider],
            outputs=[overlay, masks, table],
        )
    return demo


def main() -> None:
    model = resolve_model()
    segmenter = load_segmenter(model, os.environ.get("SERA_MODEL_REVISION") or None)
    build_demo(segmenter, model).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
    )


if __name__ == "__main__":
    main()
