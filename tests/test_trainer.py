"""SERA is a good citizen of `transformers.Trainer`: a PEFT SERA (the tuner type "SERA", as train.py builds it)
fine-tuned for a few steps with the project's collator trains exactly the paper's set, and its adapter saves and loads
back onto the base model with `PeftModel.from_pretrained`."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor, SeraTunerConfig, SeraTunerModel
from sera_training.synthetic_data import SynthRefConfig, write_dataset
from tests.helpers import TINY_HUB_CONFIG


# PeftModel reads transformers' deprecated `is_gradient_checkpointing`; that is between peft and transformers.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

STEPS = 3


class TrainerCollator:
    """The project's collator, less `sample_ids` (train.py takes them out before the forward pass too)."""

    def __init__(self, processor):
        from sera_training.collate import ReferringSegmentationCollator

        self.collator = ReferringSegmentationCollator(processor)

    def __call__(self, rows):
        batch = self.collator(rows)
        batch.pop("sample_ids")
        return batch


def test_trainer_fine_tunes_the_papers_set_and_the_adapter_reloads(tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    from sera_training.collate import COLLATOR_COLUMNS

    config = SeraConfig.from_pretrained(TINY_HUB_CONFIG)
    processor = SeraProcessor.from_pretrained(TINY_HUB_CONFIG)
    write_dataset(SynthRefConfig(seed=7, num_images=(("train", 2), ("test", 1))), tmp_path / "data")
    train_data = datasets.load_from_disk(str(tmp_path / "data"))["train"].select(range(8))
    train_data = train_data.select_columns(list(COLLATOR_COLUMNS))

    # As train.py builds it: the base without SERA modules, then the tuner injects them from the SeraConfig.
    base_config = SeraConfig.from_pretrained(TINY_HUB_CONFIG, use_sera_adapter=False, use_sera_fusion=False)
    torch.manual_seed(0)
    base = SeraForReferringSegmentation(base_config)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, SeraTunerConfig.from_sera_config(config))

    # The intended set is the paper's: what a native SERA trains after freeze_encoders().
    native = SeraForReferringSegmentation(config)
    native.freeze_encoders()
    intended = {name for name, parameter in native.named_parameters() if parameter.requires_grad}
    peft_name = {  # a PeftModel parameter name as the native SERA model calls it
        name: SeraTunerModel._remove_adapter_name_from_key(name, "default").removeprefix("base_model.model.")
        for name, _ in model.named_parameters()
    }
    trainable = {peft_name[name] for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == intended
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the collator reads image, mask, expression and sentence_id
        label_names=["labels"],
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train_data, data_collator=TrainerCollator(processor))
    result = trainer.train()
    assert result.global_step == STEPS
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))

    after = dict(model.named_parameters())
    moved = {peft_name[name] for name in before if not torch.equal(before[name], after[name].detach())}
    assert moved == intended, (
        f"trainable but unchanged: {sorted(intended - moved)[:5]}; frozen but changed: {sorted(moved - intended)[:5]}"
    )

    # Save the adapter, load the base again, put the adapter on it: the same model.
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(SeraForReferringSegmentation.from_pretrained(tmp_path / "base"), adapter_dir)
    batch = TrainerCollator(processor)([train_data[index] for index in range(2)])
    batch.pop("labels")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected, actual = model(**batch).logits, reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    untouched = SeraForReferringSegmentation.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert not torch.allclose(untouched(**batch).logits, actual)  # the adapter is what changed the model
