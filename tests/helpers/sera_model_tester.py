"""SERA's tester for transformers' own `ModelTesterMixin`, run the way an in-tree model is tested.

Not collected by this suite (the name does not start with `test_`): `tests/test_transformers_common.py` copies it
next to `tests/test_modeling_common.py` in the unpacked transformers sdist of the pinned version and runs pytest
there, in a separate process. Nothing of transformers' test code lives in this repository.

Everything here is what an in-tree model's `tests/models/<name>/test_modeling_<name>.py` provides: a model tester
(tiny config and inputs), the model classes, and the mixin's own switches for what does not apply to SERA.
"""

import importlib.util
import os
import unittest

import torch
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from modeling_sera import SeraForReferringSegmentation, SeraModel

from .test_modeling_common import ModelTesterMixin


# An in-tree model's base class is listed in MODEL_MAPPING_NAMES, which is how the mixin tells a headless base model
# (no loss, so no training tests) from a model with a head. SERA is registered with AutoModel at import instead,
# which that table does not see; list it there as an in-tree SERA would be.
MODEL_MAPPING_NAMES.setdefault("sera", "SeraModel")


def _tiny_models():
    """The suite's tiny configuration and input sizes (tests/helpers/tiny_models.py, whose folder the runner passes
    in SERA_TESTS_DIR)."""
    spec = importlib.util.spec_from_file_location(
        "sera_tests_tiny_models", os.path.join(os.environ["SERA_TESTS_DIR"], "tiny_models.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SeraModelTester:
    def __init__(self, parent, batch_size: int = 2, is_training: bool = True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        tiny_models = _tiny_models()
        self.make_config, self.vocab_size = tiny_models.tiny_sera_config, tiny_models.TINY_TEXT_VOCAB
        config = self.get_config()
        # The input sizes are the processor's (here: what the tiny processor would make), not the config's.
        self.image_size = tiny_models.TINY_IMAGE_SIZE
        self.seq_length = tiny_models.TINY_TEXT_LENGTH
        # `hidden_states` are the vision tower's: its width, its depth, and one token per patch plus CLS and registers.
        self.hidden_size = config.vision_config.hidden_size
        self.num_hidden_layers = config.vision_config.num_hidden_layers
        grid = self.image_size // config.vision_patch_size
        self.encoder_seq_length = config.num_special_vision_tokens + grid**2

    def get_config(self):
        # The suite's tiny SERA with a 2-block vision tower (the mixin wants at most 2 layers per tower): an adapter
        # in each block, fusion on both levels.
        vision_config = {
            "model_type": "dinov2_with_registers",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 4,
            "image_size": 32,
            "num_register_tokens": 2,
        }
        return self.make_config(
            vision_config=vision_config, adapter_layers=[0, 1], vision_feature_layers=[1, 2], fusion_levels=[0, 1]
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        generator = torch.Generator().manual_seed(0)
        pixel_values = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)
        # BOS, words, EOS, then padding: the layout SeraProcessor gives, with a shorter second expression.
        input_ids = torch.randint(2, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        attention_mask = torch.ones(self.batch_size, self.seq_length, dtype=torch.long)
        for row in range(self.batch_size):
            used = self.seq_length - row % 3
            input_ids[row, 0] = config.text_config.bos_token_id
            input_ids[row, used - 1] = config.text_config.eos_token_id
            input_ids[row, used:] = config.text_config.pad_token_id
            attention_mask[row, used:] = 0
        return config, pixel_values, input_ids, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, input_ids, attention_mask = self.prepare_config_and_inputs()
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        return config, inputs


class SeraModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (SeraModel, SeraForReferringSegmentation)
    # The mixin's own switches, each for something SERA does not have:
    has_attentions = False  # no `output_attentions`: SERA's outputs are masks and router weights
    test_resize_position_embeddings = False  # the mixin's default; SERA's text positions are CLIP's
    # (the mixin otherwise runs every test, resize_token_embeddings and gradient checkpointing included)

    def setUp(self):
        self.model_tester = SeraModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is SeraForReferringSegmentation:
            size = self.model_tester.image_size
            labels = torch.zeros(self.model_tester.batch_size, size, size)
            labels[:, size // 4 : size // 2, size // 3 :] = 1.0
            inputs_dict["labels"] = labels
        return inputs_dict
