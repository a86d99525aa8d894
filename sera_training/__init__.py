"""Training, evaluation, data and publishing for SERA (``modeling_sera``).

Where things are:

- ``arguments``: every training setting, as dataclasses read by ``transformers.HfArgumentParser`` (a recipe JSON,
  then command-line overrides);
- ``builders``: config, processor, encoders, the trainable model, optimizer, learning-rate schedule, data loaders;
- ``loop``: the training loop, which calls ``checkpointing`` (save, rotate, resume, best) and ``guards`` (the
  non-finite-loss stop);
- ``validation``: scoring a split on every process (a prepared DataLoader and ``gather_for_metrics``);
- ``export``: the final model folder (weights, processor, ``eval_results.json``, model card);
- ``train``: ``main()``, the command line ``sera-train`` / ``training/train.py``;
- ``evaluation``: ``sera-evaluate`` / ``training/evaluate_model.py``; data: ``synthetic_data``, ``refer_data``,
  ``hub_data``, ``data_sources``; the metric: ``metrics/referring_segmentation``.
"""
