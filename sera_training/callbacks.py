"""Hooks into the training loop, for what is not part of training itself (tests, instrumentation, experiments).

Pass instances to ``sera_training.train.main(argv, callbacks=[...])``; every method is optional.
"""


class TrainingCallback:
    def on_batch(self, accelerator, progress, epoch: int, sample_ids) -> None:
        """After each batch's forward and backward: ``sample_ids`` are the dataset ids this process trained on."""

    def on_step_end(self, accelerator, progress) -> None:
        """After each optimizer step."""

    def on_train_end(self, accelerator, model, progress) -> None:
        """After the last step (or a stop asked for), before the final model is written; ``model`` is unwrapped."""


def call(callbacks, event: str, *args) -> None:
    for callback in callbacks:
        getattr(callback, event)(*args)
