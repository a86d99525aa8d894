"""Publishing: training/push.py and model/processor.push_to_hub against a local stand-in for the Hub
(tests/hub_server.py), then loading back by repo id in a fresh process, with the same outputs."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image, ImageDraw

from sera_training.export import save_untrained_model
from tests.helpers import TINY_HUB_CONFIG
from tests.helpers.cross_process import ASSERT_LOGITS_CLOSE, assert_masks_are_stable
from tests.helpers.hub_server import HubServer


PUSHED = "sera-test/sera-synthref-tiny"  # by training/push.py
DIRECT = "sera-test/pushed-directly"  # by model.push_to_hub and processor.push_to_hub
TASK = "referring-image-segmentation"
REMOTE_CODE = (
    "configuration_sera.py",
    "modeling_sera.py",
    "sera_adapter.py",
    "sera_attention.py",
    "sera_conv.py",
    "sera_fusion.py",
    "sera_head.py",
    "sera_parameters.py",
    "sera_positions.py",
    "sera_routing.py",
    "processing_sera.py",
    "image_processing_sera.py",
)
RESULTS = {
    "model": "outputs/sera-synthref-tiny",
    "data": "synthref",
    "data_source": "synthref",
    "units": "percent",
    "splits": {
        split: {
            "oIoU": 61.25,
            "mIoU": 58.5,
            "Prec@0.5": 64.0,
            "Prec@0.6": 55.5,
            "Prec@0.7": 41.0,
            "Prec@0.8": 22.25,
            "Prec@0.9": 5.0,
            "boundary_F": 40.0,
            "num_samples": 512,
        }
        for split in ("test", "test_unseen")
    },
}


@pytest.fixture(scope="module")
def hub():
    with HubServer(token="hf_test_token") as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("push")


@pytest.fixture(scope="module")
def trained_folder(workdir):
    """What train.py leaves behind: model, processor, recipe, scores, and folders that must not be uploaded."""
    folder = workdir / "sera-synthref-tiny"
    # Seed 1: no pixel of the scene below sits within the cross-process tolerance of a threshold the test uses.
    model, processor = save_untrained_model(folder, TINY_HUB_CONFIG, seed=1)
    recipe = json.loads((TINY_HUB_CONFIG / "training_recipe.json").read_text())
    (folder / "training_recipe.json").write_text(json.dumps({**recipe, "synthetic_cache_dir": "/home/me/cache"}))
    (folder / "checkpoints" / "best").mkdir(parents=True)
    (folder / "runs").mkdir()
    (workdir / "results.json").write_text(json.dumps(RESULTS))
    return folder, model, processor


def hub_env(hub: HubServer, workdir) -> dict:
    """A fresh process's environment: the test Hub, a token, an empty HF_HOME, and not this repo on PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_") and key != "PYTHONPATH"}
    home = tempfile.mkdtemp(prefix="hf_home_", dir=workdir)
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HOME=home, HF_HUB_DISABLE_TELEMETRY="1")
    return env


def run(command: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def hub_client(hub: HubServer, token: str):
    """Point this process's huggingface_hub at the test Hub: it read HF_ENDPOINT, HF_HUB_OFFLINE (which conftest
    sets) and HF_HUB_DISABLE_TELEMETRY at import, and reads HF_TOKEN at each call."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # No telemetry: with it, the client would also fetch the Hub's list of AI-agent harnesses.
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        patch.setenv("HF_TOKEN", token)
        yield


@pytest.fixture(scope="module")
def pushed(hub, trained_folder, workdir):
    """`python training/push.py`, run in this process (a subprocess would spend seconds importing torch again)."""
    from sera_training.push import main

    folder, _, _ = trained_folder
    printed = io.StringIO()
    with hub_client(hub, hub.token), contextlib.redirect_stdout(printed):
        main([str(folder), "--repo-id", PUSHED, "--private", "--results", str(workdir / "results.json")])
    return printed.getvalue()


@pytest.fixture(scope="module")
def pushed_directly(hub, trained_folder, workdir, pushed):
    """model.push_to_hub and processor.push_to_hub to a new repo, then processor.push_to_hub to the one push.py
    wrote. (A model loaded from the training folder would not carry push.py's custom_pipelines entry: pushing it
    there would drop the pipeline from config.json.)"""
    folder, _, _ = trained_folder
    script = textwrap.dedent(
        f"""
        from modeling_sera import SeraForReferringSegmentation, SeraProcessor
        model = SeraForReferringSegmentation.from_pretrained({str(folder)!r})
        processor = SeraProcessor.from_pretrained({str(folder)!r})
        model.push_to_hub({DIRECT!r})
        processor.push_to_hub({DIRECT!r})
        processor.mask_threshold = 0.4  # a real change: unchanged files make no commit at all
        processor.push_to_hub({PUSHED!r}, commit_message="Update the processor")
        """
    )
    result = run([sys.executable, "-c", script], hub_env(hub, workdir), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]


def test_push_uploads_model_code_pipeline_recipe_and_card_in_one_commit(hub, pushed):
    assert f"{hub.url}/{PUSHED}/commit/" in pushed
    repo = hub.repo(PUSHED)
    assert repo.private
    push_commit = repo.commits[1]  # after the Hub's initial commit; pushed_directly may add more later
    assert push_commit.message == "Upload SERA model sera-synthref-tiny"
    files = push_commit.files
    expected = {
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_recipe.json",
        "pipeline_sera.py",
        *REMOTE_CODE,
    }
    assert set(files) == expected  # no checkpoints/, runs/ or eval_results.json

    config = json.loads(files["config.json"])
    assert config["custom_pipelines"][TASK] == {
        "impl": "pipeline_sera.ReferringImageSegmentationPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
    assert config["auto_map"]["AutoModel"] == "modeling_sera.SeraForReferringSegmentation"
    assert json.loads(files["processor_config.json"])["auto_map"]["AutoProcessor"] == "processing_sera.SeraProcessor"
    recipe = json.loads(files["training_recipe.json"])
    assert recipe["learning_rate"] == 1e-3 and recipe["synthetic_cache_dir"] == "cache"  # no local paths

    assert not hub.unserved, hub.unserved  # the test Hub implements every endpoint the push needed


def test_the_card_has_results_metadata_definitions_and_citation(hub, pushed):
    card = ModelCard(hub.repo(PUSHED).commits[1].files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert "referring-image-segmentation" in card.data.tags and "custom_code" in card.data.tags
    assert card.data.model_name == "sera-synthref-tiny"
    results = {(result.dataset_split, result.metric_type): result.metric_value for result in card.data.eval_results}
    assert len(results) == 2 * 7
    assert results[("test", "mIoU")] == 58.5 and results[("test_unseen", "oIoU")] == 61.25
    text = card.text
    assert f'pipeline("{TASK}", model="{PUSHED}", trust_remote_code=True)' in text
    assert "Σ I_i / Σ U_i" in text and "mean over samples of I_i / U_i" in text and "Prec@X" in text
    assert "| test | 61.25 | 58.50 | 64.00 | 55.50 | 41.00 | 22.25 | 5.00 |" in text
    assert "<!-- results start: synthref -->" in text  # evaluate.py --model-card can update it later
    max_train_steps = json.loads((TINY_HUB_CONFIG / "training_recipe.json").read_text())["max_train_steps"]
    assert f"| `max_train_steps` | `{max_train_steps}` |" in text and "synthetic scenes" in text
    assert "## Limitations" in text and "Dalaq, Alaa and Behzad, Muzammil" in text and "2603.12538" in text
    assert "{{" not in text and "{%" not in text


def test_push_to_hub_uploads_model_processor_and_remote_code_and_keeps_the_card(hub, pushed_directly):
    files = hub.files(DIRECT)
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", *REMOTE_CODE} <= set(files)
    assert "README.md" in files  # transformers writes a default card into a new repo
    # Pushing into the published repo keeps the card push.py wrote.
    repo = hub.repo(PUSHED)
    assert repo.head.message == "Update the processor"
    # The threshold's one home is the image processor (SeraProcessor.mask_threshold reads and writes it).
    assert json.loads(repo.head.files["processor_config.json"])["image_processor"]["mask_threshold"] == 0.4
    assert repo.head.files["README.md"] == repo.commits[1].files["README.md"]
    assert repo.head.files["config.json"] == repo.commits[1].files["config.json"]


def test_both_repos_load_back_by_repo_id_in_a_fresh_process_with_equal_outputs(
    hub, trained_folder, workdir, pushed, pushed_directly
):
    _, model, processor = trained_folder
    image = Image.new("RGB", (90, 60), (225, 225, 215))
    ImageDraw.Draw(image).ellipse((10, 15, 40, 45), fill=(220, 30, 30))
    image.save(workdir / "scene.png")
    inputs = processor(images=[image], text=["the red circle"], return_tensors="pt")
    with torch.no_grad():
        logits = model(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    mask = processor.post_process_referring_segmentation(logits, inputs["original_sizes"])[0]["mask"]
    # So that the masks can be compared exactly, at this threshold and at the one pushed_directly pushed.
    for threshold in (processor.mask_threshold, 0.4):
        assert_masks_are_stable(processor, logits, inputs["original_sizes"], threshold)
    torch.save({"logits": logits, "mask": mask}, workdir / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline

        expected = torch.load({str(workdir / "expected.pt")!r})
        reference = expected["logits"]
        image = Image.open({str(workdir / "scene.png")!r})
        for repo_id in ({PUSHED!r}, {DIRECT!r}):
            model = AutoModel.from_pretrained(repo_id, trust_remote_code=True).eval()
            processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
            inputs = processor(images=[image], text=["the red circle"], return_tensors="pt")
            with torch.no_grad():
                logits = model(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                               attention_mask=inputs["attention_mask"]).logits
            {ASSERT_LOGITS_CLOSE}  # fp32 bounds: see tests/helpers/cross_process.py
            result = processor.post_process_referring_segmentation(
                logits, inputs["original_sizes"], threshold={processor.mask_threshold}
            )[0]
            assert torch.equal(result["mask"], expected["mask"]), repo_id
        segmenter = pipeline({TASK!r}, model={PUSHED!r}, trust_remote_code=True, device="cpu")
        result = segmenter(image, "the red circle")
        np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, expected["mask"].numpy())
        assert not any(name.split(".")[0] == "modeling_sera" for name in sys.modules)
        print("LOADED-BY-REPO-ID")
        """
    )
    result = run([sys.executable, "-c", script], hub_env(hub, workdir), cwd=workdir)
    assert "LOADED-BY-REPO-ID" in result.stdout, result.stderr[-3000:]
    assert any(path.startswith(f"/{PUSHED}/resolve/") for _, path in hub.requests)
    assert not hub.unserved, hub.unserved


def test_a_wrong_token_is_one_line_that_says_what_to_do(hub, trained_folder):
    from sera_training.push import main

    with hub_client(hub, "hf_wrong"), pytest.raises(SystemExit) as raised:
        main([str(trained_folder[0]), "--repo-id", "sera-test/other"])
    error = str(raised.value.code)
    assert error.startswith("training/push.py: error: the Hub refused the push (401") and "\n" not in error
    assert "hf auth login" in error and "sera-test/other" not in hub.state.repos


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["{missing}", "--repo-id", "org/name"], "model folder not found"),
        (["{empty}", "--repo-id", "org/name"], "has no config.json"),
        (["{model}", "--repo-id", "no-namespace"], "needs its namespace"),
        (["{model}", "--repo-id", "org/bad name"], "--repo_id org/bad name"),
        (["{model}", "--repo-id", "org/name", "--results", "{missing}"], "Results file not found"),
        (["{model}", "--repo-id", "org/name", "--results", "{model}/config.json"], "has no 'data' name and 'splits'"),
    ],
)
def test_bad_input_is_one_line_that_says_what_to_do(arguments, message, trained_folder, tmp_path, monkeypatch):
    from sera_training.push import main

    monkeypatch.setattr("sera_training.push.get_token", lambda: "hf_any")
    (tmp_path / "empty").mkdir()
    folder, _, _ = trained_folder
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "model": folder}
    with pytest.raises(SystemExit) as raised:
        main([argument.format(**paths) for argument in arguments])
    error = str(raised.value.code)
    assert error.startswith("training/push.py: error: ") and "\n" not in error and message in error, error


def test_no_token_fails_before_any_work(trained_folder, monkeypatch):
    from sera_training.push import main

    monkeypatch.setattr("sera_training.push.get_token", lambda: None)
    with pytest.raises(SystemExit, match="no Hugging Face token: log in with `hf auth login` or set HF_TOKEN"):
        main([str(trained_folder[0]), "--repo-id", "org/name"])


def test_local_dir_previews_the_repository_with_train_py_s_results(trained_folder, tmp_path):
    from sera_training.push import main

    folder = tmp_path / "trained"
    shutil.copytree(trained_folder[0], folder)
    # train.py's eval_results.json: the scores plus the run's summary, found without --results.
    summary = {
        "completed_steps": 300,
        "epochs": 2.4,
        "num_processes": 1,
        "weights_from": "the last step (300)",
        "encoders": "random (no pretrained encoder weights were available)",
    }
    (folder / "eval_results.json").write_text(json.dumps({**RESULTS, "train": summary}))
    preview = tmp_path / "preview"
    assert main([str(folder), "--repo-id", "org/sera-preview", "--local-dir", str(preview)]) == 0
    assert (preview / "pipeline_sera.py").is_file() and not (preview / "eval_results.json").exists()
    card = ModelCard.load(preview / "README.md")
    assert card.data.model_name == "sera-preview" and len(card.data.eval_results) == 14
    assert (
        "This checkpoint: 300 optimizer steps (2.40 epochs) on 1 process(es); the weights are from the last step"
        in card.text
    )
