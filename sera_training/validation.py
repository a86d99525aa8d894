"""Scoring during and after training, on every process: a DataLoader prepared by the accelerator shards the split,
each process reduces its predictions to the metric's per-sample counts, and ``accelerator.gather_for_metrics``
brings the counts of all processes together (without the samples padded in to even the shards), so every process
gets the same scores and none waits idle."""

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.logging import get_logger
from torch.utils.data import DataLoader

from sera_training.evaluation import batch_counts, scores_and_records


logger = get_logger(__name__)
COUNT_KEYS = ("area", "area_matched", "boundary", "boundary_matched")


def score_split(accelerator, model, processor, dataset, batch_size: int, record_samples: bool = False):
    """The metric's results on ``dataset`` (with ``record_samples``: ``(results, records)``), on every process.

    ``model`` is the unwrapped model; it is put in eval mode and back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    # Sharded like accelerator.prepare would, but neither registered with the accelerator (its checkpoints hold the
    # training loader only) nor synchronising random states; a generator of its own, since a DataLoader otherwise draws
    # its base seed from the global RNG: scoring must not move the training's random streams.
    loader = prepare_data_loader(
        DataLoader(range(len(dataset)), batch_size=batch_size, collate_fn=torch.tensor, generator=torch.Generator()),
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
    )
    gathered = []
    with torch.inference_mode():
        for indices in loader:
            rows = dataset[indices.tolist()]
            counts = batch_counts(model, processor, rows, accelerator.device)
            local = torch.tensor(
                [
                    [index] + [side[key] for side in pair for key in COUNT_KEYS]
                    for index, pair in zip(indices.tolist(), counts)
                ],
                dtype=torch.int64,
                device=accelerator.device,
            ).reshape(-1, 1 + 2 * len(COUNT_KEYS))
            gathered.append(accelerator.gather_for_metrics(local).cpu())
    model.train(was_training)
    table = torch.cat(gathered)
    table = table[table[:, 0].argsort()].tolist()  # dataset order, whatever the sharding
    width = len(COUNT_KEYS)
    counts = [(dict(zip(COUNT_KEYS, row[1 : 1 + width])), dict(zip(COUNT_KEYS, row[1 + width :]))) for row in table]
    categories = dataset["category"] if "category" in dataset.column_names else [""] * len(dataset)
    categories = [categories[row[0]] for row in table]
    return scores_and_records(counts, categories, record_samples)


class Validator:
    """Validation after an optimizer step: scores the capped validation split, logs it, appends it to the history,
    redraws the plot and saves the ``best`` checkpoint when the validation mIoU improves."""

    def __init__(self, accelerator, model, processor, dataset, args, progress, checkpointer):
        self.accelerator, self.model, self.processor, self.dataset = accelerator, model, processor, dataset
        self.args, self.progress, self.checkpointer = args, progress, checkpointer

    def due(self, step: int, end_of_epoch: bool, last: bool) -> bool:
        eval_steps = self.args.eval_steps
        return self.dataset is not None and (
            (eval_steps and step % eval_steps == 0) or last or (not eval_steps and end_of_epoch)
        )

    def __call__(self) -> dict:
        from sera_training.gallery import write_validation_plot

        accelerator, progress = self.accelerator, self.progress
        unwrapped = accelerator.unwrap_model(self.model)
        results = score_split(
            accelerator, unwrapped, self.processor, self.dataset, self.args.per_device_eval_batch_size
        )
        step = progress.completed_steps
        per_category = {category: scores["mIoU"] for category, scores in results.get("per_category", {}).items()}
        progress.history.append(
            {"step": step, "mIoU": results["mIoU"], "oIoU": results["oIoU"], "per_category_mIoU": per_category}
        )
        if accelerator.is_main_process:  # validation mIoU per category against steps, next to the TensorBoard logs
            write_validation_plot(progress.history, self.args.output_dir / "runs" / "validation_mIoU.png")
        accelerator.log({"validation/mIoU": results["mIoU"], "validation/oIoU": results["oIoU"]}, step=step)
        logger.info(f"step {step}: validation mIoU {results['mIoU']:.2f}, oIoU {results['oIoU']:.2f}")
        if results["mIoU"] > progress.best_metric:
            progress.best_metric = results["mIoU"]
            progress.best_step = step
            self.checkpointer.save("best")
        return results
