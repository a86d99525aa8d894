"""Where the code review of #12 found the model departing from the method (DETRIS's skeleton, which SERA keeps), the
method is the default and the old behaviour an option. Each test fails on the old default."""

import pytest
import torch
import torch.nn.functional as F

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraImageProcessor
from modeling_sera.image_processing_sera import letterbox_geometry
from modeling_sera.sera_routing import router_balance_loss, router_entropy_loss
from tests.helpers import tiny_batch, tiny_sera_config


def test_default_levels_are_taken_after_0_based_blocks_4_and_8_as_in_detris():
    assert SeraConfig().vision_feature_layers == [5, 9, 12]


def test_a_level_is_the_hidden_state_after_that_many_blocks():
    torch.manual_seed(0)
    config = tiny_sera_config(vision_feature_layers=[1, 3, 4], use_sera_adapter=False, use_sera_fusion=False)
    model = SeraForReferringSegmentation(config).eval()
    batch = tiny_batch()
    captured = {}

    def keep_levels(module, args):
        captured["levels"] = [level.clone() for level in args[0]]

    model.model.neck.register_forward_pre_hook(keep_levels)
    with torch.no_grad():
        hidden_states = model.model.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True)
        model(**batch)
    special = config.num_special_vision_tokens
    for level, blocks_passed in zip(captured["levels"][:2], (1, 3)):
        tokens = hidden_states.hidden_states[blocks_passed][:, special:]
        torch.testing.assert_close(level.flatten(2).transpose(1, 2), tokens)
        # ... and not the entry one block earlier, which the old [4, 8, 12] default amounted to.
        assert not torch.allclose(
            level.flatten(2).transpose(1, 2), hidden_states.hidden_states[blocks_passed - 1][:, special:]
        )


def _post_process(logits, sigmoid_before_resize, size=(37, 23)):
    processor = SeraImageProcessor(size={"height": 32, "width": 32}, sigmoid_before_resize=sigmoid_before_resize)
    return processor.post_process_referring_segmentation(logits, target_sizes=[size])[0]


def test_post_processing_takes_the_sigmoid_before_resizing_by_default():
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 8, 8) * 6
    result = _post_process(logits, sigmoid_before_resize=True)
    assert SeraImageProcessor().sigmoid_before_resize is True
    # The same geometry applied to probabilities: upsample to the square, cut the content, resize to the original.
    new_height, new_width, top, left = letterbox_geometry(37, 23, 32)
    square = F.interpolate(logits.sigmoid(), size=(32, 32), mode="bilinear", align_corners=False)
    content = square[..., top : top + new_height, left : left + new_width]
    expected = F.interpolate(content, size=(37, 23), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(result["probabilities"], expected[0, 0])
    old = _post_process(logits, sigmoid_before_resize=False)
    assert not torch.allclose(result["probabilities"], old["probabilities"])
    assert (old["probabilities"] == old["probabilities"].clamp(0, 1)).all()


def test_the_old_order_is_kept_as_an_option_and_survives_save_and_load(tmp_path):
    processor = SeraImageProcessor(size={"height": 32, "width": 32}, sigmoid_before_resize=False)
    processor.save_pretrained(tmp_path)
    assert SeraImageProcessor.from_pretrained(tmp_path).sigmoid_before_resize is False


def _routed(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_sera_config(**overrides)
    return SeraForReferringSegmentation(config).train(), tiny_batch(4)


def test_sparse_only_noise_leaves_a_dense_router_deterministic_in_training():
    for noise, deterministic in (("always", False), ("sparse_only", True)):
        model, batch = _routed(fusion_router_noise=noise, fusion_router_noise_std=1.0, decoder_dropout=0.0)
        with torch.no_grad():
            first = model(**batch).fusion_router_weights[0]
            second = model(**batch).fusion_router_weights[0]
        assert torch.equal(first, second) is deterministic
    # With K < 4 the noise still picks experts.
    model, batch = _routed(fusion_router_noise="sparse_only", fusion_top_k=1, fusion_router_noise_std=50.0)
    with torch.no_grad():
        picks = {tuple(model(**batch).fusion_router_weights[0].argmax(-1).tolist()) for _ in range(6)}
    assert len(picks) > 1


def test_router_regularizers_on_clean_weights_and_summed_over_levels():
    labels = torch.rand(4, 32, 32)
    model, batch = _routed(fusion_router_noise_std=1.0)
    noisy = model(**batch, labels=labels)
    for name, value in (("router_regularizer_weights", "clean"), ("router_loss_level_reduction", "sum")):
        setattr(model.config, name, value)
    torch.manual_seed(1)
    clean_summed = model(**batch, labels=labels)
    clean_weights = [level.softmax(-1) for level in clean_summed.fusion_router_logits]
    config = model.config
    expected_balance = sum(router_balance_loss(level) for level in clean_weights) * config.router_balance_loss_weight
    expected_entropy = sum(router_entropy_loss(level) for level in clean_weights) * config.router_entropy_loss_weight
    torch.testing.assert_close(clean_summed.router_balance_loss, expected_balance)
    torch.testing.assert_close(clean_summed.router_entropy_loss, expected_entropy)
    levels = len(clean_weights)
    torch.testing.assert_close(
        clean_summed.router_z_loss, noisy.router_z_loss * levels, rtol=1e-5, atol=1e-8
    )  # same clean logits, summed instead of averaged


def test_unknown_router_option_is_refused_with_its_choices():
    with pytest.raises(ValueError, match="fusion_router_noise='sometimes' must be one of"):
        tiny_sera_config(fusion_router_noise="sometimes")
