"""Publish a trained SERA model folder on the Hugging Face Hub, in one commit: weights, config, processor, their remote
code, the referring-image-segmentation pipeline, the training recipe and a model card.

    python training/push.py MODEL_DIR --repo_id org/sera-refcoco [--private] [--results results.json ...]
        [--recipe training_recipe.json] [--commit_message MESSAGE] [--local_dir DIR]

MODEL_DIR is a folder written by ``train.py`` (or by ``model.save_pretrained`` and ``processor.save_pretrained``). The
model is loaded with this package's classes (weights that do not match the current code are refused) and saved again
through ``ReferringImageSegmentationPipeline.save_pretrained``, so the repository gets the current remote code and
the pipeline's ``custom_pipelines`` entry in config.json. After the push, on a machine without this package::

    AutoModel.from_pretrained("org/sera-refcoco", trust_remote_code=True)
    AutoProcessor.from_pretrained("org/sera-refcoco", trust_remote_code=True)
    pipeline("referring-image-segmentation", model="org/sera-refcoco", trust_remote_code=True)

The card (README.md) is rendered from ``MODEL_CARD.md`` (see ``model_card.py``) with the scores of ``--results``
(default: ``MODEL_DIR/eval_results.json`` when there is one) and the recipe of ``--recipe`` (default:
``MODEL_DIR/training_recipe.json``). Everything goes up in a single commit, so nobody sees a half-updated repository;
files of an earlier push are overwritten, files this push does not write are left alone. ``--private`` applies when
the repository is created. ``checkpoints/`` and ``runs/`` of a training folder are never uploaded.

Authentication is huggingface_hub's (``hf auth login`` or the ``HF_TOKEN`` variable); ``HF_ENDPOINT`` points it at
another Hub (the tests use a local one, see ``tests/hub_server.py``).
"""

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from modeling_sera import ReferringImageSegmentationPipeline, SeraForReferringSegmentation, SeraProcessor
from sera_training.model_card import build_model_card, load_results, public_recipe


PROG = "training/push.py"
RECIPE_FILE = "training_recipe.json"
RESULTS_FILE = "eval_results.json"


def fail(message: str):
    raise SystemExit(f"{PROG}: error: {message}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Publish a trained SERA folder on the Hugging Face Hub with its code and model card."
    )
    parser.add_argument("model_dir", type=Path, help="folder written by train.py or save_pretrained")
    parser.add_argument("--repo_id", "--repo-id", required=True, help="the model repository, e.g. org/sera-refcoco")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--results",
        type=Path,
        action="append",
        help=f"scores for the card, from sera-evaluate --output; repeat for more data sources (default: "
        f"MODEL_DIR/{RESULTS_FILE} when present)",
    )
    parser.add_argument("--recipe", type=Path, help=f"the training recipe (default: MODEL_DIR/{RECIPE_FILE})")
    parser.add_argument("--commit_message", "--commit-message", help="default: 'Upload SERA model <name>'")
    parser.add_argument(
        "--local_dir", "--local-dir", type=Path, help="write the repository's files here and upload nothing"
    )
    args = parser.parse_args(argv)
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        fail(f"--repo_id {args.repo_id}: {error}")
    if args.repo_id.count("/") != 1:
        fail(
            f"--repo_id {args.repo_id} needs its namespace: your user name or an organisation, e.g. org/sera-refcoco."
        )
    if not args.model_dir.is_dir():
        fail(f"model folder not found: {args.model_dir}. Pass a folder written by train.py or save_pretrained.")
    if not (args.model_dir / "config.json").is_file():
        fail(
            f"{args.model_dir} has no config.json, so it is not a saved model. Pass a folder written by save_pretrained."
        )
    if args.local_dir is not None and args.local_dir.exists() and any(args.local_dir.iterdir()):
        fail(f"--local_dir {args.local_dir} is not empty; pass a new or empty folder.")
    if args.local_dir is None and get_token() is None:
        fail("no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (or preview with --local_dir).")
    return args


def load_checkpoint(model_dir: Path):
    """The model and processor of `model_dir`, refusing weights the current code would load only in part."""
    model, loading_info = SeraForReferringSegmentation.from_pretrained(model_dir, output_loading_info=True)
    problems = {kind: keys for kind, keys in loading_info.items() if keys and kind != "error_msgs"}
    if problems:
        summary = "; ".join(f"{kind}: {', '.join(map(str, keys[:3]))}" for kind, keys in problems.items())
        fail(
            f"the weights in {model_dir} do not match the current SERA code ({summary}). Retrain, or push with the "
            "version of this package that wrote them."
        )
    if not (model_dir / "processor_config.json").is_file():
        fail(
            f"{model_dir} has no processor_config.json: save the processor next to the model with "
            f"processor.save_pretrained('{model_dir}')."
        )
    return model.eval(), SeraProcessor.from_pretrained(model_dir)


def read_inputs(args) -> tuple[list[dict], dict | None, dict | None]:
    """The results reports, the recipe and (from train.py's eval_results.json) the training summary."""
    results_paths = args.results
    if results_paths is None:
        default = args.model_dir / RESULTS_FILE
        results_paths = [default] if default.is_file() else []
    try:
        reports = [load_results(path) for path in results_paths]
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    recipe_path = args.recipe or args.model_dir / RECIPE_FILE
    if args.recipe is not None and not recipe_path.is_file():
        fail(f"recipe not found: {recipe_path}.")
    recipe = json.loads(recipe_path.read_text(encoding="utf-8")) if recipe_path.is_file() else None
    summary = next((report["train"] for report in reports if isinstance(report.get("train"), dict)), None)
    if recipe is None:
        recipe = next((report["recipe"] for report in reports if isinstance(report.get("recipe"), dict)), None)
    return reports, recipe, summary


def write_repository(model, processor, repo_id: str, folder: Path, reports, recipe, summary) -> list[Path]:
    """Write every file of the repository into `folder` and return them."""
    folder.mkdir(parents=True, exist_ok=True)
    # Saving through the pipeline adds its code and its config.json entry to the model's and processor's files.
    ReferringImageSegmentationPipeline(model=model, processor=processor, device="cpu").save_pretrained(folder)
    card = build_model_card(model, processor, repo_id, recipe=recipe, reports=reports, training_summary=summary)
    card.save(folder / "README.md")
    if recipe is not None:
        (folder / RECIPE_FILE).write_text(json.dumps(public_recipe(recipe), indent=2) + "\n", encoding="utf-8")
    return sorted(path for path in folder.rglob("*") if path.is_file())


def upload(folder: Path, files: list[Path], repo_id: str, private: bool, commit_message: str):
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in files
    ]
    return api.create_commit(repo_id, operations=operations, commit_message=commit_message)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reports, recipe, summary = read_inputs(args)
    model, processor = load_checkpoint(args.model_dir)

    if args.local_dir is not None:
        files = write_repository(model, processor, args.repo_id, args.local_dir, reports, recipe, summary)
        print(f"Wrote the {len(files)} files of {args.repo_id} to {args.local_dir}; nothing was uploaded.")
        return 0

    staging = Path(tempfile.mkdtemp(prefix="sera-push-"))
    try:
        files = write_repository(model, processor, args.repo_id, staging, reports, recipe, summary)
        message = args.commit_message or f"Upload SERA model {args.repo_id.split('/')[-1]}"
        commit = upload(staging, files, args.repo_id, args.private, message)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        first_line = str(error).strip().splitlines()[0]
        fail(f"the Hub refused the push ({status}: {first_line}). Check --repo-id and your token (hf auth login).")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Pushed {len(files)} files of {args.model_dir} to {commit.commit_url}")
    print(f'Load it with pipeline("referring-image-segmentation", model="{args.repo_id}", trust_remote_code=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
