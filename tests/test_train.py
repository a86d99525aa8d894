"""training/train.py (sera_training): end to end through `accelerate launch` on tiny synthetic data, exact resume,
the non-finite loss stop, a 2-process CPU run; plus the recipe and collate helpers in-process.

The launched runs share one tiny synthetic dataset (built once into a temporary cache) and the tiny hub config, and
run a handful of optimizer steps each, so the whole file takes about a minute on two CPU cores.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sera_training import arguments, builders, train
from tests.helpers import REPO_ROOT
from tests.helpers.training_runs import DEBUG_LOG_SCRIPT, TINY_CONFIG, check_ok, launch


# Small, but enough to cover a resume in the middle of an epoch, gradient accumulation with a partial window at the
# end of an epoch (3 batches per epoch, 2 per step) and the crossing into the next epoch.
RESUME_ARGS = (
    "--max_train_samples 6 --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --max_train_steps 4 "
    "--eval_steps 2 --checkpointing_steps 1 --checkpoints_total_limit 10 --max_eval_samples 6 "
    "--per_device_eval_batch_size 6"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthref-cache")


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, cache_dir):
    """The reference run: 4 optimizer steps without interruption, test splits scored, model folder written."""
    output_dir = tmp_path_factory.mktemp("run") / "uninterrupted"
    result = launch(RESUME_ARGS, output_dir, cache_dir)
    check_ok(result)
    return output_dir, result


@pytest.fixture
def in_process_accelerate():
    """For tests that run train.py code in this process: leave no accelerate state or global settings behind."""
    import logging

    import datasets
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    datasets.enable_progress_bars()
    logging.getLogger("accelerate").setLevel(logging.NOTSET)


# ---------------------------------------------------------------------------------------------------------------------
# In-process helpers (fast)


def test_swap_left_right_and_flip_decisions():
    from sera_training.collate import flip_decision, swap_left_right

    assert swap_left_right("the circle left of the Rightmost star") == "the circle right of the Leftmost star"
    assert swap_left_right("LEFT square, right one; bright leftover") == "RIGHT square, left one; bright leftover"
    decisions = [flip_decision(0, 3, sample, 0.5) for sample in range(200)]
    assert decisions == [flip_decision(0, 3, sample, 0.5) for sample in range(200)]  # pure function
    assert 60 < sum(decisions) < 140
    assert decisions != [flip_decision(0, 4, sample, 0.5) for sample in range(200)]  # changes with the epoch
    assert not any(flip_decision(0, 3, sample, 0.0) for sample in range(200))


def test_collator_flips_image_mask_and_words_together():
    import numpy as np
    from PIL import Image

    from modeling_sera import SeraProcessor
    from sera_training.collate import ReferringSegmentationCollator

    processor = SeraProcessor.from_pretrained(TINY_CONFIG)
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :10] = 255  # a white stripe on the left
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:, :10] = 255
    row = {
        "image": Image.fromarray(image),
        "mask": Image.fromarray(mask),
        "expression": "the left stripe",
        "sentence_id": 7,
    }
    plain = ReferringSegmentationCollator(processor)([row])
    flipped = ReferringSegmentationCollator(processor, horizontal_flip_probability=1.0)([row])
    assert plain["sample_ids"].tolist() == [7]
    assert torch.equal(flipped["labels"], plain["labels"].flip(-1))
    assert torch.allclose(flipped["pixel_values"], plain["pixel_values"].flip(-1))
    right = processor(text=["the right stripe"], return_tensors="pt")["input_ids"]
    assert torch.equal(flipped["input_ids"], right)


def test_lr_schedules_warm_up_and_decay_to_zero():
    def learning_rates(scheduler_args, total_steps):
        args = arguments.parse_args(["--config_name", str(TINY_CONFIG), *scheduler_args])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = builders.build_lr_scheduler(optimizer, args, total_steps)
        rates = []
        for _ in range(total_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return args.learning_rate, rates, scheduler

    peak, rates, _ = learning_rates(["--lr_scheduler_type", "multistep"], 130)
    assert rates[:120] == [peak] * 120 and rates[120] == pytest.approx(peak * 0.1)  # step 60/65 of 130
    peak, rates, scheduler = learning_rates(["--lr_scheduler_type", "linear", "--warmup_ratio", "0.1"], 100)
    assert rates[0] == 0 and rates[5] == pytest.approx(peak / 2) and rates[10] == pytest.approx(peak)
    assert rates[55] == pytest.approx(peak / 2) and rates[-1] == pytest.approx(peak / 90)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11])) and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    # Its state is what a checkpoint stores: a fresh schedule that loads it goes on where this one stopped.
    args = arguments.parse_args(["--config_name", str(TINY_CONFIG), "--lr_scheduler_type", "linear"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    resumed = builders.build_lr_scheduler(optimizer, args, 100)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.last_epoch == 100
    _, cosine, _ = learning_rates(["--lr_scheduler_type", "cosine"], 100)
    assert cosine[0] == peak and cosine[50] == pytest.approx(peak / 2) and cosine[-1] < peak / 1000

    with pytest.raises(arguments.TrainingError, match="warmup_ratio needs lr_scheduler_type linear or cosine"):
        learning_rates(["--warmup_ratio", "0.1"], 100)
    with pytest.raises(arguments.TrainingError, match="warmup_ratio must be in"):
        arguments.parse_args(["--config_name", str(TINY_CONFIG), "--warmup_ratio", "1.5"])


def test_recipe_and_command_line_overrides(tmp_path):
    args = arguments.parse_args(["--config_name", str(TINY_CONFIG)])
    recipe = json.loads((TINY_CONFIG / "training_recipe.json").read_text())
    assert args.learning_rate == recipe["learning_rate"] == 1e-3
    assert args.lr_milestones == recipe["lr_milestones"] == [60]
    assert args.num_train_epochs == 65 and args.lr_gamma == 0.1
    assert args.per_device_train_batch_size == 16 and args.horizontal_flip_probability == 0.0
    assert args.output_dir == Path("outputs") / "sera-synthref-tiny"
    # A milestone keeps its place in a shortened run: 60/65 of the steps.
    assert builders.milestone_steps(args, 650) == [600]
    assert builders.milestone_steps(args, args.max_train_steps) == [round(60 * args.max_train_steps / 65)]
    paper = arguments.parse_args(["--config_name", str(TINY_CONFIG), "--lr_milestones", "35", "55"])
    assert builders.milestone_steps(paper, 650) == [350, 550]

    custom = tmp_path / "recipe.json"
    custom.write_text(json.dumps({"learning_rate": 5e-4, "max_train_steps": 50, "eval_steps": 5}))
    args = arguments.parse_args(
        [
            "--config_name",
            str(TINY_CONFIG),
            "--recipe",
            str(custom),
            "--lr_milestones",
            "2,4",
            "--seed",
            "3",
            "--validation_split",
            "none",
            "--test_splits",
            "test",
            "--checkpointing_steps",
            "epoch",
            "--eval_steps",
            "none",
            "--synthetic_num_images",
            "train=5,test=2",
        ]
    )
    assert (args.learning_rate, args.max_train_steps, args.seed) == (5e-4, 50, 3)
    assert args.lr_milestones == [2, 4] and args.eval_steps is None and args.validation_split is None
    assert args.test_splits == ["test"] and args.checkpointing_steps == "epoch"
    assert args.synthetic_num_images == {"train": 5, "test": 2}
    # Epochs asked for on the command line win over the recipe's step cap.
    args = arguments.parse_args(
        ["--config_name", str(TINY_CONFIG), "--recipe", str(custom), "--num_train_epochs", "3"]
    )
    assert args.num_train_epochs == 3 and args.max_train_steps is None

    custom.write_text(json.dumps({"learning_rat": 1e-4}))
    with pytest.raises(arguments.TrainingError, match="learning_rat"):
        arguments.parse_args(["--config_name", str(TINY_CONFIG), "--recipe", str(custom)])


def test_config_overrides_give_the_papers_ablation_rows():
    args = arguments.parse_args(
        ["--config_name", str(TINY_CONFIG), "--config_overrides", "use_sera_adapter=false,use_sera_fusion=false"]
    )
    config = builders.load_model_config(args)
    assert not config.use_sera_adapter and not config.use_sera_fusion
    args = arguments.parse_args(["--config_name", str(TINY_CONFIG), "--config_overrides", "fusion_top_k=2"])
    assert builders.load_model_config(args).fusion_top_k == 2
    args = arguments.parse_args(["--config_name", str(TINY_CONFIG), "--config_overrides", "fusion_top_k=9"])
    with pytest.raises(arguments.TrainingError, match="fusion_top_k"):
        builders.load_model_config(args)


def test_the_processor_holds_the_sizes_and_the_recipe_sets_them(tmp_path):
    def processor_for(*flags, config_name=TINY_CONFIG):
        args = arguments.parse_args(["--config_name", str(config_name), *flags])
        config = builders.load_model_config(args)
        return builders.load_processor(args, config, builders.find_encoders(args)), config

    processor, config = processor_for()
    assert (processor.image_size, processor.max_text_length) == (128, 16)
    assert not hasattr(config, "image_size") and not hasattr(config, "max_text_length")
    processor, _ = processor_for("--image_size", "64", "--max_text_length", "12")
    assert (processor.image_size, processor.max_text_length) == (64, 12)
    # Where the processor meets the config, a misfit is one clear line (patch 8, 48 text positions).
    with pytest.raises(arguments.TrainingError, match="image_size=60 must be a multiple of the vision patch size 8"):
        processor_for("--image_size", "60")
    with pytest.raises(arguments.TrainingError, match="max_text_length=60 exceeds .* max_position_embeddings=48"):
        processor_for("--max_text_length", "60")
    # A folder without a processor (the real-size ones): built from the encoders, at the recipe's sizes.
    folder = tmp_path / "no-processor"
    folder.mkdir()
    (folder / "config.json").write_text((TINY_CONFIG / "config.json").read_text())
    (folder / "training_recipe.json").write_text(json.dumps({"image_size": 96, "max_text_length": 12}))
    encoders = ["--encoder_weights", str(TINY_CONFIG)]
    processor, _ = processor_for(*encoders, config_name=folder)
    assert (processor.image_size, processor.max_text_length, processor.mask_threshold) == (96, 12, 0.35)


def test_paper_recipe_files():
    for name in ("sera-synthref-tiny", "sera-refcoco"):
        recipe = json.loads((REPO_ROOT / "hub_configs" / name / "training_recipe.json").read_text())
        assert recipe["optimizer"] == "adam" and recipe["lr_gamma"] == 0.1 and recipe["num_train_epochs"] == 65
        assert recipe["per_device_train_batch_size"] == 16 and recipe["horizontal_flip_probability"] == 0.0
    paper = json.loads((REPO_ROOT / "hub_configs/sera-refcoco/training_recipe.json").read_text())
    assert paper["learning_rate"] == 1e-4 and paper["lr_milestones"] == [35, 55]
    # The tiny default run departs from the paper only where its recipe says so.
    tiny = json.loads((REPO_ROOT / "hub_configs/sera-synthref-tiny/training_recipe.json").read_text())
    assert (tiny["learning_rate"], tiny["lr_milestones"], tiny["max_train_steps"]) == (1e-3, [60], 500)
    assert "lr 1e-3" in tiny["_comment"] and "60/65" in tiny["_comment"]
    assert json.loads((REPO_ROOT / "hub_configs/sera-refcoco/training_recipe.json").read_text())["image_size"] == 448


def test_pretrained_encoders_are_loaded_and_the_paper_regime_is_trainable(tmp_path, in_process_accelerate):
    from accelerate import PartialState
    from transformers import AutoModel, CLIPTextModelWithProjection

    import modeling_sera

    PartialState(cpu=True)  # train.py logs through accelerate
    config = modeling_sera.SeraConfig.from_pretrained(TINY_CONFIG)
    torch.manual_seed(123)
    vision = AutoModel.from_config(config.vision_config)
    text = CLIPTextModelWithProjection(config.text_config)
    vision.save_pretrained(tmp_path / "encoders" / "vision_encoder")
    text.save_pretrained(tmp_path / "encoders" / "text_encoder")

    tunings = ["freeze"] + (["peft"] if hasattr(modeling_sera, "SeraTunerConfig") else [])
    trainable_counts = {}
    for tuning in tunings:
        args = arguments.parse_args(
            ["--config_name", str(TINY_CONFIG), "--encoder_weights", str(tmp_path / "encoders"), "--tuning", tuning]
        )
        model, used = builders.build_trainable_model(config, args, builders.find_encoders(args))
        assert used == tuning
        sera = model.get_base_model() if tuning == "peft" else model
        loaded_vision, loaded_text = sera.model.vision_model, sera.model.text_model
        assert torch.equal(
            loaded_vision.embeddings.patch_embeddings.projection.weight,
            vision.embeddings.patch_embeddings.projection.weight,
        )
        assert torch.equal(loaded_vision.encoder.layer[2].mlp.fc2.weight, vision.encoder.layer[2].mlp.fc2.weight)
        assert torch.equal(
            loaded_text.text_model.embeddings.token_embedding.weight, text.text_model.embeddings.token_embedding.weight
        )
        trainable = [name for name, _ in builders.trainable_named_parameters(model)]
        # The paper's regime: encoder weights frozen, their norms and biases trained, SERA modules and head trained.
        assert not any(name.endswith("patch_embeddings.projection.weight") for name in trainable)
        assert not any(name.endswith("token_embedding.weight") for name in trainable)
        assert any("layernorm" in name and "vision_model" in name for name in trainable)
        assert any("sera_adapter" in name for name in trainable) and any("decoder" in name for name in trainable)
        trainable_counts[tuning] = sum(
            parameter.numel() for _, parameter in builders.trainable_named_parameters(model)
        )
    assert len(set(trainable_counts.values())) == 1, trainable_counts  # both ways train the same set


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_bad_dataset_fails_at_start(tmp_path, capsys, problem, in_process_accelerate):
    if problem == "missing":
        source = tmp_path / "no-such-dataset"
    else:
        source = tmp_path / "damaged"
        source.mkdir()
        (source / "dataset_dict.json").write_text('{"splits": ["train"]}')
    code = train.main(
        [
            "--config_name",
            str(TINY_CONFIG),
            "--dataset",
            str(source),
            "--output_dir",
            str(tmp_path / "out"),
            "--report_to",
            "none",
        ]
    )
    assert code == train.EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert f"Could not load the dataset {str(source)!r}" in error
    assert not (tmp_path / "out" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Launched runs


def test_end_to_end_outputs(uninterrupted_run):
    from transformers import AutoModel, AutoProcessor

    output_dir, result = uninterrupted_run
    # The printed table, per category too.
    assert "| test |" in result.stdout and "| test_unseen |" in result.stdout
    assert "| test | attribute |" in result.stdout

    report = json.loads((output_dir / "eval_results.json").read_text())
    assert set(report) >= {"data", "units", "splits", "validation", "train", "recipe"}
    assert set(report["splits"]) == {"test", "test_unseen"}
    for scores in report["splits"].values():
        assert {"oIoU", "mIoU", "Prec@0.5", "Prec@0.9", "num_samples", "per_category"} <= set(scores)
        assert scores["num_samples"] == 6
    assert [entry["step"] for entry in report["validation"]["history"]] == [2, 4]
    assert report["train"]["completed_steps"] == 4 and report["train"]["tuning"] in ("peft", "freeze")
    assert report["recipe"]["learning_rate"] == 1e-3

    card = (output_dir / "README.md").read_text()
    assert "results start: synthref" in card and "| test_unseen |" in card
    assert list((output_dir / "runs").rglob("events.out.tfevents.*")), "no tensorboard logs"
    checkpoints = output_dir / "checkpoints"
    assert {path.name for path in checkpoints.iterdir()} == {"best", "step_1", "step_2", "step_3", "step_4"}
    progress = json.loads((checkpoints / "step_4" / "progress.json").read_text())
    assert (progress["completed_steps"], progress["epoch"], progress["batches_in_epoch"]) == (4, 1, 3)

    # A standalone folder: merged weights, processor and remote code.
    assert (output_dir / "modeling_sera.py").is_file() and (output_dir / "processing_sera.py").is_file()
    model, loading = AutoModel.from_pretrained(output_dir, trust_remote_code=True, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    assert type(model).__name__ == "SeraForReferringSegmentation"
    assert model.config.use_sera_adapter and model.config.use_sera_fusion
    assert not any(loading[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    inputs = processor(images=[torch.zeros(3, 50, 70)], text=["the red circle"], return_tensors="pt")
    with torch.no_grad():
        logits = model(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits
    assert torch.isfinite(logits).all()


def test_resume_is_bit_identical(uninterrupted_run, cache_dir, tmp_path):
    reference, _ = uninterrupted_run
    output_dir = tmp_path / "interrupted"
    stopped = launch(RESUME_ARGS + " --stop_after_steps 1 --test_splits ''", output_dir, cache_dir)
    check_ok(stopped)
    assert not (output_dir / "config.json").exists(), "a stopped run must not write the final model"
    assert json.loads((output_dir / "checkpoints" / "step_1" / "progress.json").read_text())["batches_in_epoch"] == 2

    resumed = launch(RESUME_ARGS + " --resume_from_checkpoint latest --test_splits ''", output_dir, cache_dir)
    check_ok(resumed)
    assert "Resumed from" in resumed.stderr + resumed.stdout

    expected_history = json.loads((reference / "eval_results.json").read_text())["validation"]["history"]
    assert json.loads((output_dir / "eval_results.json").read_text())["validation"]["history"] == expected_history
    for step in (2, 4):  # the first step after the resume, and the end (after crossing into the next epoch)
        expected = load_file(reference / "checkpoints" / f"step_{step}" / "model.safetensors")
        actual = load_file(output_dir / "checkpoints" / f"step_{step}" / "model.safetensors")
        assert expected.keys() == actual.keys()
        different = [name for name in expected if not torch.equal(expected[name], actual[name])]
        assert not different, f"step {step}: weights differ after resuming: {different[:5]}"
    # The comparison means something: the trained weights did move between the checkpoints.
    first = load_file(reference / "checkpoints" / "step_1" / "model.safetensors")
    last = load_file(reference / "checkpoints" / "step_4" / "model.safetensors")
    assert sum(not torch.equal(first[name], last[name]) for name in first) > 50


def test_non_finite_loss_stops_with_message(cache_dir, tmp_path):
    output_dir = tmp_path / "diverging"
    options = (
        "--learning_rate 1e30 --max_train_samples 4 --per_device_train_batch_size 2 --max_train_steps 4 "
        "--validation_split none --checkpointing_steps none"
    )
    result = launch(options, output_dir, cache_dir)
    assert result.returncode != 0
    assert "non-finite loss at optimizer step 2" in result.stderr
    assert "mask_loss=" in result.stderr or "router_" in result.stderr
    assert f"last good checkpoint is {output_dir / 'checkpoints' / 'step_1'}" in result.stderr
    weights = load_file(output_dir / "checkpoints" / "step_1" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())
    assert not (output_dir / "config.json").exists()


def test_two_processes_shard_data_and_stay_in_sync(cache_dir, tmp_path):
    output_dir = tmp_path / "ddp"
    debug_dir = tmp_path / "debug"
    options = (
        "--max_train_samples 8 --per_device_train_batch_size 2 --max_train_steps 2 --eval_steps 2 "
        f"--max_eval_samples 4 --checkpointing_steps none --debug_log_dir {debug_dir}"
    )
    result = launch(options, output_dir, cache_dir, num_processes=2, script=DEBUG_LOG_SCRIPT)
    check_ok(result)
    seen = {}
    for rank in (0, 1):
        records = [json.loads(line) for line in (debug_dir / f"samples_rank{rank}.jsonl").read_text().splitlines()]
        assert len(records) == 2 and all(len(record["sample_ids"]) == 2 for record in records)
        seen[rank] = [sample for record in records for sample in record["sample_ids"]]
    assert not set(seen[0]) & set(seen[1]), f"both processes trained on the same samples: {seen}"
    assert len(set(seen[0]) | set(seen[1])) == 8  # one epoch over the 8 samples, split between the processes
    checksums = [json.loads((debug_dir / f"weights_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert checksums[0]["sha256"] == checksums[1]["sha256"], "the processes' trainable weights diverged"
    assert checksums[0]["completed_steps"] == 2
    report = json.loads((output_dir / "eval_results.json").read_text())
    assert report["train"]["num_processes"] == 2 and set(report["splits"]) == {"test", "test_unseen"}


def test_cpu_runs_use_the_cores_they_share(monkeypatch):
    """`accelerate launch` exports OMP_NUM_THREADS=1; train.py gives each process its share of the cores instead."""

    class OneProcess:
        num_processes = 1

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.cpu_threads_per_process(OneProcess()) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores + 1))
    assert train.cpu_threads_per_process(OneProcess()) == 1
    args = arguments.parse_args(["--config_name", str(TINY_CONFIG), "--cpu_threads", "3"])
    assert args.cpu_threads == 3 and "cpu_threads" not in arguments.recipe_of(args)


def test_eval_results_and_card_name_the_dataset_not_its_local_path(tmp_path, cache_dir):
    """train.py once wrote the raw --dataset string (a local path) into eval_results.json, which push.py and the
    model card read as the dataset's name."""
    from sera_training.synthetic_data import SynthRefConfig, write_dataset

    folder = tmp_path / "my-referring-data"
    write_dataset(SynthRefConfig(num_images=(("train", 2), ("validation", 1), ("test", 1))), folder)
    output_dir = tmp_path / "run"
    options = (
        f"--dataset {folder} --test_splits test --max_train_steps 1 --per_device_train_batch_size 2 "
        "--eval_steps none --checkpointing_steps none --max_eval_samples 2"
    )
    result = launch(options, output_dir, cache_dir)
    check_ok(result)
    report = json.loads((output_dir / "eval_results.json").read_text())
    assert report["data"] == "my-referring-data"
    card = (output_dir / "README.md").read_text()
    assert str(tmp_path) not in card
    assert "my-referring-data" in card


def test_a_best_checkpoint_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    """save_checkpoint moves the old `best` aside before renaming the new one in; a kill in between must not lose
    it (the resume puts it back), and a complete `best` is never replaced by the aside copy."""
    from sera_training.checkpointing import restore_checkpoint

    aside = tmp_path / ".best.old"
    aside.mkdir()
    (aside / "model.safetensors").write_text("old best")
    restore_checkpoint(tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_text() == "old best" and not aside.exists()

    aside.mkdir()
    (aside / "model.safetensors").write_text("older")
    restore_checkpoint(tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_text() == "old best"
