"""``accelerate launch tests/helpers/train_with_debug_log.py --debug_log_dir DIR [train.py options]``: train.py with
a callback that makes each process write the sample ids it trained on (``samples_rank<N>.jsonl``) and a checksum of
its trainable weights at the end (``weights_rank<N>.json``), to check sharding and synchronisation."""

import json
import sys
from pathlib import Path

from sera_training.builders import weights_checksum
from sera_training.callbacks import TrainingCallback
from sera_training.train import main


class DebugLog(TrainingCallback):
    def __init__(self, directory: Path):
        self.directory = directory
        self.samples = None

    def on_batch(self, accelerator, progress, epoch, sample_ids):
        if self.samples is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.samples = open(self.directory / f"samples_rank{accelerator.process_index}.jsonl", "a")
        record = {"step": progress.completed_steps, "epoch": epoch, "sample_ids": sample_ids.tolist()}
        self.samples.write(json.dumps(record) + "\n")

    def on_train_end(self, accelerator, model, progress):
        if self.samples is not None:
            self.samples.close()
        checksum = {
            "rank": accelerator.process_index,
            "completed_steps": progress.completed_steps,
            "sha256": weights_checksum(model),
        }
        (self.directory / f"weights_rank{accelerator.process_index}.json").write_text(json.dumps(checksum) + "\n")


if __name__ == "__main__":
    argv = sys.argv[1:]
    position = argv.index("--debug_log_dir")
    directory = Path(argv[position + 1])
    del argv[position : position + 2]
    sys.exit(main(argv, callbacks=[DebugLog(directory)]))
