"""Tiny SERA configurations and inputs built on the spot (nothing is downloaded).

Imports nothing from the test suite, so that `helpers/sera_model_tester.py`, which runs inside transformers' own test
tree, can load this file by its path.
"""

import torch


TINY_TEXT_VOCAB = 64
# The inputs the tiny model is tested at: a processor setting (letterbox side, tokens per expression), not a config one.
TINY_IMAGE_SIZE = 32
TINY_TEXT_LENGTH = 8


def tiny_sera_config(**overrides):
    """A SERA small enough for a CPU test: 4-block vision tower with registers, 2-layer CLIP text tower."""
    from modeling_sera import SeraConfig

    settings = dict(
        vision_config=dict(
            model_type="dinov2_with_registers",
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=4,
            image_size=TINY_IMAGE_SIZE,
            num_register_tokens=2,
        ),
        text_config=dict(
            model_type="clip_text_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=TINY_TEXT_VOCAB,
            max_position_embeddings=16,
            projection_dim=24,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        adapter_layers=[1, 3],
        adapter_dim=16,
        adapter_num_heads=2,
        vision_feature_layers=[2, 3, 4],
        fusion_router_hidden_size=8,
        fusion_context_num_heads=2,
        fusion_context_mlp_ratio=2.0,
        hidden_size=32,
        decoder_num_layers=2,
        decoder_num_heads=2,
        decoder_intermediate_size=64,
        decoder_dropout=0.0,
        projector_dim=16,
    )
    settings.update(overrides)
    return SeraConfig(**settings)


def tiny_batch(batch_size: int = 2, seed: int = 0, image_size: int = TINY_IMAGE_SIZE, length: int = TINY_TEXT_LENGTH):
    """Random pixel values and token ids shaped like SeraProcessor's output (BOS ... EOS, then padding), at the
    processor's sizes `image_size` and `length`."""
    generator = torch.Generator().manual_seed(seed)
    size = image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    input_ids = torch.randint(2, TINY_TEXT_VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    for row in range(batch_size):
        used = 3 + row % (length - 3)
        input_ids[row, 0] = 0
        input_ids[row, used - 1] = 1
        input_ids[row, used:] = 1
        attention_mask[row, :used] = 1
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
