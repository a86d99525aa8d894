"""The training loop. It reads top to bottom: for each batch, forward, the non-finite-loss check, backward and the
optimizer step; after each optimizer step, the learning-rate step, logging, validation and checkpoints. What each of
those does lives in the object it calls (``guards``, ``validation``, ``checkpointing``, ``callbacks``)."""

import time

from tqdm.auto import tqdm

from sera_training.callbacks import call
from sera_training.guards import LOSS_COMPONENTS, NonFiniteLossGuard


def train_loop(
    accelerator,
    model,
    optimizer,
    scheduler,
    train_dataloader,
    collator,
    args,
    progress,
    schedule,
    checkpointer,
    validator,
    callbacks=(),
):
    """Trains until ``total_steps`` optimizer steps are done (or ``args.stop_after_steps``); returns the meter (its
    ``stopped_early``, ``runtime``, ``samples``). ``schedule`` is ``(total_steps, num_epochs)``."""
    total_steps, num_epochs = schedule
    guard = NonFiniteLossGuard(accelerator, model, progress, checkpointer)
    meter = TrainingMeter(accelerator, args, progress, total_steps, len(train_dataloader))
    model.train()
    while progress.completed_steps < total_steps and progress.epoch < num_epochs:
        epoch, skip = progress.epoch, progress.batches_in_epoch
        collator.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        if skip >= len(train_dataloader):  # the checkpoint was taken at the very end of the epoch
            progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            continue
        guard.start_epoch(skip)
        for batch in accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader:
            sample_ids = batch.pop("sample_ids")
            with accelerator.accumulate(model):
                outputs = model(**batch)
                losses = guard.check(outputs)  # (processes, components); stops the run on a NaN or inf
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            meter.batch_done(losses, len(sample_ids) * accelerator.num_processes)
            call(callbacks, "on_batch", accelerator, progress, epoch, sample_ids)
            if not accelerator.sync_gradients:
                continue

            # One optimizer step is complete.
            scheduler.step()
            progress.completed_steps += 1
            guard.step_done()
            step = progress.completed_steps
            meter.step_done(scheduler.get_last_lr()[0], epoch)
            end_of_epoch = progress.batches_in_epoch >= len(train_dataloader)
            last = step >= total_steps
            if validator.due(step, end_of_epoch, last):
                validator()
            every = args.checkpointing_steps
            if (isinstance(every, int) and step % every == 0) or (every == "epoch" and end_of_epoch):
                checkpointer.save(f"step_{step}")
            call(callbacks, "on_step_end", accelerator, progress)
            if args.stop_after_steps is not None and step >= args.stop_after_steps and not last:
                checkpointer.save_step()
                meter.stopped_early = True
            if last or meter.stopped_early:
                return meter.close()
        progress.epoch, progress.batches_in_epoch = epoch + 1, 0
    return meter.close()


class TrainingMeter:
    """The progress bar, the throughput and the loss components averaged over each logging interval."""

    def __init__(self, accelerator, args, progress, total_steps: int, batches_per_epoch: int):
        self.accelerator, self.args, self.progress = accelerator, args, progress
        self.total_steps, self.batches_per_epoch = total_steps, batches_per_epoch
        self.bar = tqdm(
            total=total_steps,
            initial=progress.completed_steps,
            desc="Training",
            unit="step",
            disable=args.no_progress_bar or not accelerator.is_local_main_process,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        self.samples = 0  # trained since this (re)start, over all processes
        self.start = time.perf_counter()
        self.runtime = 0.0
        self.stopped_early = False
        self._reset_interval()

    def _reset_interval(self) -> None:
        self.interval = {name: 0.0 for name in LOSS_COMPONENTS}
        self.interval_batches = 0

    def batch_done(self, losses, samples: int) -> None:
        self.samples += samples
        self.progress.samples_seen += samples
        self.last = losses.mean(dim=0)
        for index, name in enumerate(LOSS_COMPONENTS):
            self.interval[name] += self.last[index].item()
        self.interval_batches += 1

    def throughput(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)

    def step_done(self, learning_rate: float, epoch: int) -> None:
        step = self.progress.completed_steps
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{self.last[0].item():.4f}",
            lr=f"{learning_rate:.1e}",
            samples_per_s=f"{self.throughput():.1f}",
            refresh=False,
        )
        if step % self.args.logging_steps == 0 or step == self.total_steps:
            logs = {f"train/{name}": value / self.interval_batches for name, value in self.interval.items()}
            logs["train/learning_rate"] = learning_rate
            logs["train/samples_per_second"] = self.throughput()
            logs["train/epoch"] = epoch + self.progress.batches_in_epoch / self.batches_per_epoch
            self.accelerator.log(logs, step=step)
            self._reset_interval()

    def close(self) -> "TrainingMeter":
        self.bar.close()
        self.runtime = time.perf_counter() - self.start
        return self
