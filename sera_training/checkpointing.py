"""Checkpoints of a training run: where they are written, how they are kept, how a run resumes from them.

Every checkpoint is ``accelerator.save_state`` into ``<output_dir>/checkpoints/<name>`` (``step_N`` or ``best``),
written aside as ``.<name>.partial`` and renamed into place, so a checkpoint folder that exists is complete. Replacing
``best`` moves the old one aside (``.best.old``) until the new one is in place; :meth:`Checkpointer.restore_best`
puts it back after a kill in between. Only the newest ``checkpoints_total_limit`` step_N checkpoints are kept.
The counters a resumed run needs (:class:`TrainingProgress`) are saved with each one, so a resumed run continues
bit for bit.
"""

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.logging import get_logger

from sera_training.arguments import TrainingError


logger = get_logger(__name__)


@dataclass
class TrainingProgress:
    """The counters a resumed run needs, saved with every checkpoint (``accelerator.register_for_checkpointing``)."""

    completed_steps: int = 0  # optimizer steps
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of `epoch` consumed by this process when the checkpoint was taken
    samples_seen: int = 0  # over all processes
    best_metric: float = -1.0  # validation mIoU of the best checkpoint
    best_step: int = -1
    history: list = field(default_factory=list)  # validation results: {"step", "mIoU", "oIoU", "per_category_mIoU"}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def step_checkpoints(directory: Path) -> list[Path]:
    """Finished step_N checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.glob("step_*") if re.fullmatch(r"step_\d+", path.name) and path.is_dir()]
    return sorted(found, key=lambda path: int(path.name.split("_")[1]))


def restore_checkpoint(path: Path) -> None:
    """Puts back a checkpoint that :meth:`Checkpointer.save` had moved aside when a kill stopped it from renaming the
    new one into place."""
    previous = path.with_name(f".{path.name}.old")
    if not path.exists() and previous.is_dir():
        previous.rename(path)


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Only the model weights of an accelerate checkpoint (the optimizer and counters stay as they are)."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model.load_state_dict(state, strict=True)


class Checkpointer:
    """Saves, rotates and finds the checkpoints of one run in ``<output_dir>/checkpoints``."""

    def __init__(self, accelerator, output_dir: Path, progress: TrainingProgress, total_limit: int | None):
        self.accelerator = accelerator
        self.directory = Path(output_dir) / "checkpoints"
        self.progress = progress
        self.total_limit = total_limit
        self.last: Path | None = None  # the newest step_N checkpoint of this run (or the one it resumed from)

    @property
    def best(self) -> Path:
        return self.directory / "best"

    def save(self, name: str) -> Path:
        """accelerator.save_state into <checkpoints>/<name>, written aside and renamed; then the oldest step_N
        checkpoints beyond the limit are removed."""
        accelerator = self.accelerator
        final = self.directory / name
        partial = self.directory / f".{name}.partial"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (partial / "progress.json").write_text(json.dumps(self.progress.state_dict(), indent=2) + "\n")
            # The old one is moved aside, not deleted, until the new one is in place, so a kill at any moment leaves
            # a complete checkpoint or a `.<name>.old` that restore_checkpoint puts back.
            previous = final.with_name(f".{name}.old")
            if previous.exists():
                shutil.rmtree(previous)
            if final.exists():
                final.rename(previous)
            partial.rename(final)
            shutil.rmtree(previous, ignore_errors=True)
            if name.startswith("step_") and self.total_limit:
                for old in step_checkpoints(self.directory)[: -self.total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        logger.info(f"Checkpoint saved: {final}")
        if name.startswith("step_"):
            self.last = final
        return final

    def save_step(self) -> Path:
        """The checkpoint of the current step, unless it was written already."""
        name = f"step_{self.progress.completed_steps}"
        if self.last is not None and self.last.name == name:
            return self.last
        return self.save(name)

    def restore_best(self) -> None:
        if self.accelerator.is_main_process:
            restore_checkpoint(self.best)
        self.accelerator.wait_for_everyone()

    def resume(self, resume_from_checkpoint: str | None) -> Path | None:
        """Loads the state of the checkpoint asked for (a folder, or 'latest'); returns it (None: a fresh start)."""
        path = self._resolve(resume_from_checkpoint)
        if path is None and step_checkpoints(self.directory):
            logger.warning(
                f"{self.directory} holds checkpoints of an earlier run; this run starts afresh and replaces them as "
                "it goes. Pass --resume_from_checkpoint latest to continue that run instead."
            )
        if path is not None:
            self.accelerator.load_state(str(path))
            logger.info(f"Resumed from {path}: step {self.progress.completed_steps}, epoch {self.progress.epoch}")
        self.last = path
        return path

    def _resolve(self, resume_from_checkpoint: str | None) -> Path | None:
        if resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint == "latest":
            found = step_checkpoints(self.directory)
            if not found:
                logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {self.directory}; starting fresh.")
                return None
            return found[-1]
        path = Path(resume_from_checkpoint)
        if not (path / "progress.json").is_file():
            raise TrainingError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no progress.json).")
        return path

    def load_best_weights(self, model: torch.nn.Module) -> bool:
        """Puts the best checkpoint's weights into ``model`` when there is one from this run; False otherwise."""
        progress = self.progress
        if progress.best_step <= 0 or not (self.best / "model.safetensors").is_file():
            return False
        if progress.best_step != progress.completed_steps:
            load_model_weights(model, self.best)
        return True
