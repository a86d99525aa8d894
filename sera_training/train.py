"""Train SERA for referring image segmentation with accelerate, evaluate it and write a standalone model folder.

    accelerate launch training/train.py                      # the tiny default: synthref data, ~15 min on 2 CPU cores
    accelerate launch training/train.py --config_name hub_configs/sera-refcoco --dataset refer:/data/refer:refcoco:unc
    sera-train --max_train_steps 2000                        # the same, installed (one process)

What a run does, and where:

1. Settings (``arguments``): the model config and processor from ``--config_name`` (a folder such as
   ``hub_configs/sera-synthref-tiny``), the training recipe from ``<config_name>/training_recipe.json`` (or
   ``--recipe``), every field overridable on the command line (``--learning_rate 3e-4``...). The paper's recipe:
   Adam, lr 1e-4, x0.1 at epochs 35 and 55 of 65, batch 16, 448 input, no flips.
2. Data (``builders.load_splits``): the built-in synthetic ``synthref`` by default, checked at once.
3. The model (``builders.build_trainable_model``): SERA in the paper's regime, which ``modeling_sera`` defines
   (SERA-Adapters, SERA-Fusion and the head trained, both encoders frozen except their LayerNorm and bias terms). The
   encoders start from ``<config_name>/vision_encoder`` + ``text_encoder`` (or ``--encoder_weights``...; see
   ``builders.find_encoders``) when there are some, from random weights otherwise.
4. Training (``loop.train_loop``): any number of processes, gradient accumulation, seedable sampler; the learning
   rate decays in ``builders.build_lr_scheduler``; validation (``validation.Validator``) every ``--eval_steps`` or
   epoch on a capped validation subset, on every process; checkpoints (``checkpointing.Checkpointer``) in
   ``<output_dir>/checkpoints/step_N`` and ``best``, ``--resume_from_checkpoint latest`` continuing bit for bit.
   A NaN or infinite loss stops the run (exit code 3) and names the step and the loss component (``guards``).
5. The end (``export``): the test splits scored (per category too), the table printed and ``<output_dir>`` written:
   the merged model and its processor with their remote code, a model-card draft ``README.md``,
   ``eval_results.json`` and the resolved ``training_recipe.json``. ``checkpoints/`` and ``runs/`` (tensorboard)
   sit in the same folder; leave them out when pushing to the Hub.
"""

import json
import logging
import math
import os
import sys
import time

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed

from modeling_sera.configuration_sera import FUSION_NUM_EXPERTS
from sera_training import builders, export
from sera_training.arguments import TrainingError, parse_args, recipe_of
from sera_training.callbacks import call
from sera_training.checkpointing import Checkpointer, TrainingProgress
from sera_training.guards import NonFiniteLossError
from sera_training.loop import train_loop
from sera_training.validation import Validator


logger = get_logger(__name__)

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3


def cpu_threads_per_process(accelerator: Accelerator) -> int:
    """The cores this process may use, shared among the processes on this machine.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, which would leave a single-process CPU run on
    one core of several.
    """
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    # sched_getaffinity honours CPU pinning (containers, taskset); it is Linux-only, cpu_count is the fallback.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def build_accelerator(args, config) -> Accelerator:
    # With fewer than all fusion experts per sample, an expert can go unused in a step: DDP must then be told.
    sparse_routing = config.use_sera_fusion and config.fusion_top_k < FUSION_NUM_EXPERTS
    accelerator = Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if sparse_routing else None,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "runs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.cpu_threads or cpu_threads_per_process(accelerator))
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages drown ours
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    datasets.utils.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    return accelerator


def main(argv=None, callbacks=()) -> int:
    """The command line (``sera-train``, ``training/train.py``). ``callbacks``: :class:`callbacks.TrainingCallback`
    objects the loop calls (tests and instrumentation pass theirs)."""
    try:
        args = parse_args(argv)
        config = builders.load_model_config(args)
    except TrainingError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    accelerator = build_accelerator(args, config)
    try:
        return train(args, config, accelerator, callbacks)
    except TrainingError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as error:
        print(f"train.py: {error}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    finally:
        accelerator.end_training()


def train(args, config, accelerator: Accelerator, callbacks=()) -> int:
    start_time = time.perf_counter()
    set_seed(args.seed)
    encoders = builders.find_encoders(args)
    processor = builders.load_processor(args, config, encoders)
    train_data, validation_data, test_data = builders.select_splits(args, builders.load_splits(args, accelerator))
    model, tuning = builders.build_trainable_model(config, args, encoders)
    num_trainable = sum(parameter.numel() for _, parameter in builders.trainable_named_parameters(model))
    num_total = sum(parameter.numel() for parameter in model.parameters())
    optimizer = builders.build_optimizer(model, args)
    train_dataloader, collator = builders.build_train_dataloader(train_data, processor, args)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = builders.build_lr_scheduler(optimizer, args, total_steps)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(scheduler, progress)
    if args.report_to not in (None, "none"):
        hyperparameters = {
            key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            for key, value in recipe_of(args).items()
        }
        accelerator.init_trackers("sera", config=hyperparameters)

    checkpointer = Checkpointer(accelerator, args.output_dir, progress, args.checkpoints_total_limit)
    checkpointer.resume(args.resume_from_checkpoint)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_data)} training expressions, {accelerator.num_processes} process(es), global batch "
        f"{global_batch}, {steps_per_epoch} steps per epoch, {total_steps} steps ({num_epochs} epochs), lr "
        f"{args.learning_rate} {builders.describe_lr_schedule(args, total_steps)}; tuning: "
        f"{tuning}; trainable {num_trainable:,} of {num_total:,} parameters"
    )
    checkpointer.restore_best()
    validator = Validator(accelerator, model, processor, validation_data, args, progress, checkpointer)
    meter = train_loop(
        accelerator, model, optimizer, scheduler, train_dataloader, collator, args, progress,
        (total_steps, num_epochs), checkpointer, validator, callbacks,
    )  # fmt: skip
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    call(callbacks, "on_train_end", accelerator, unwrapped, progress)
    if meter.stopped_early:
        logger.info(f"Stopped after {progress.completed_steps} steps as asked; resume with --resume_from_checkpoint")
        return 0

    # The final model: the best validation checkpoint, or the last weights; scored on every process.
    weights_from = f"the last step ({progress.completed_steps})"
    if args.final_weights == "best" and checkpointer.load_best_weights(unwrapped):
        weights_from = f"step {progress.best_step}, the best validation mIoU ({progress.best_metric:.2f})"
    final_model = builders.plain_model(unwrapped, tuning).eval()
    from sera_training.data_sources import parse_source

    data_name = parse_source(args.dataset).name  # "refcoco(unc)", a Hub id or a folder's name: never a local path
    results_by_split = export.score_test_splits(accelerator, final_model, processor, test_data, args, data_name)
    if not accelerator.is_main_process:
        return 0
    training_summary = {
        "completed_steps": progress.completed_steps,
        "epochs": progress.samples_seen / len(train_data),
        "samples_seen": progress.samples_seen,
        "num_processes": accelerator.num_processes,
        "train_runtime_s": meter.runtime,
        "train_samples_per_second": meter.samples / max(meter.runtime, 1e-9),
        "total_runtime_s": time.perf_counter() - start_time,
        "tuning": tuning,
        "encoders": builders.describe_encoders(encoders),
        "trainable_parameters": num_trainable,
        "total_parameters": num_total,
        "weights_from": weights_from,
    }
    report = export.build_report(args, data_name, results_by_split, progress, training_summary)
    export.write_model_folder(final_model, processor, args, report)
    export.print_results(data_name, results_by_split, weights_from)
    print(f"\nModel written to {args.output_dir} ({time.perf_counter() - start_time:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
