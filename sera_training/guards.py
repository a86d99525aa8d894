"""The non-finite-loss stop: a NaN or infinite loss on any process ends the run with a message naming the step, the
process and the loss component, and leaves the model and a checkpoint exactly as the last good step left them."""

import math

import torch


LOSS_COMPONENTS = ("loss", "mask_loss", "router_z_loss", "router_balance_loss", "router_entropy_loss")


class NonFiniteLossError(Exception):
    """The loss became NaN or infinite; the message says where."""


class NonFiniteLossGuard:
    """Called by the loop on every batch (:meth:`check`) and after every optimizer step (:meth:`step_done`).

    The forward pass updates BatchNorm statistics before its loss can be checked: the guard keeps those of the last
    good step, so that a non-finite loss leaves the model exactly as that step left it.
    """

    def __init__(self, accelerator, model, progress, checkpointer):
        self.accelerator = accelerator
        self.model = model
        self.progress = progress
        self.checkpointer = checkpointer
        self.batches_at_last_step = progress.batches_in_epoch
        self.good_buffers = self._snapshot()

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: buffer.detach().clone() for name, buffer in self._unwrapped().named_buffers()}

    def start_epoch(self, batches_done: int) -> None:
        self.batches_at_last_step = batches_done

    def step_done(self) -> None:
        self.batches_at_last_step = self.progress.batches_in_epoch
        self.good_buffers = self._snapshot()

    def check(self, outputs) -> torch.Tensor:
        """The loss components of every process, ``(num_processes, len(LOSS_COMPONENTS))``; raises
        :class:`NonFiniteLossError` (after restoring the last good state) when one is not finite."""
        components = torch.stack([getattr(outputs, name).detach().float() for name in LOSS_COMPONENTS])
        per_process = self.accelerator.gather(components[None])
        if not torch.isfinite(per_process).all():
            self.progress.batches_in_epoch = self.batches_at_last_step  # the state after the last good step
            with torch.no_grad():
                for name, buffer in self._unwrapped().named_buffers():
                    buffer.copy_(self.good_buffers[name])
            self._stop(per_process)
        return per_process

    def _stop(self, per_process: torch.Tensor):
        """Keep the last good weights as a checkpoint, then stop with a message naming the step and the component."""
        progress, checkpointer = self.progress, self.checkpointer
        bad = []
        for rank, values in enumerate(per_process.tolist()):
            names = [f"{name}={value}" for name, value in zip(LOSS_COMPONENTS, values) if not math.isfinite(value)]
            if names:
                bad.append(f"rank {rank}: " + ", ".join(names))
        components = {
            name for name, value in zip(LOSS_COMPONENTS, per_process.T.tolist()) if not all(map(math.isfinite, value))
        }
        culprit = [name for name in LOSS_COMPONENTS[1:] if name in components] or [
            "loss (the sum of finite parts overflowed)"
        ]
        last = checkpointer.last
        if progress.completed_steps > 0:  # the weights are still those after the last good step: keep them
            path = checkpointer.directory / f"step_{progress.completed_steps}"
            last = path if path.exists() else checkpointer.save(path.name)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise NonFiniteLossError(
            f"error: non-finite loss at optimizer step {progress.completed_steps + 1} (epoch {progress.epoch}, batch "
            f"{progress.batches_in_epoch + 1}): {'; '.join(bad)}. Non-finite component(s): {', '.join(culprit)}. "
            f"Training stopped; {kept}. Lower --learning_rate or set --max_grad_norm, then resume with "
            "--resume_from_checkpoint."
        )
