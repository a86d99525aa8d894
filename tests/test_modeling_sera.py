"""SeraConfig / SeraModel / SeraForReferringSegmentation: shapes, losses, ablation switches, loading, dtypes."""

import json
import textwrap

import pytest
import torch

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraImageProcessor
from modeling_sera.processing_sera import check_processor_fits
from modeling_sera.sera_fusion import (
    BOUNDARY_FILTERS,
    FUSION_EXPERT_NAMES,
    GAUSSIAN,
    LAPLACIAN,
    SHAPE_FILTERS,
    SOBEL_X,
    SOBEL_Y,
    fixed_filter_stack,
)
from tests.helpers import REPO_ROOT, TINY_IMAGE_SIZE, TINY_TEXT_VOCAB, tiny_batch, tiny_sera_config
from tests.helpers.cross_process import ASSERT_LOGITS_CLOSE, run_in_fresh_process


def build(seed: int = 0, **overrides) -> SeraForReferringSegmentation:
    torch.manual_seed(seed)
    return SeraForReferringSegmentation(tiny_sera_config(**overrides))


def test_forward_shapes_and_router_outputs(tiny_config):
    model = SeraForReferringSegmentation(tiny_config).eval()
    batch = tiny_batch(3)
    with torch.no_grad():
        outputs = model(**batch, output_hidden_states=True)
    grid = TINY_IMAGE_SIZE // tiny_config.vision_patch_size
    assert outputs.logits.shape == (3, 1, 4 * grid, 4 * grid)
    assert outputs.loss is None
    assert len(outputs.adapter_router_weights) == len(tiny_config.adapter_layers)
    for weights in outputs.adapter_router_weights:
        assert weights.shape == (3, 2)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert len(outputs.fusion_router_weights) == len(tiny_config.fusion_levels)
    for weights in outputs.fusion_router_weights:
        assert weights.shape == (3, len(FUSION_EXPERT_NAMES))
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
    assert [level.shape for level in outputs.vision_hidden_states] == [(3, 32, grid, grid)] * 3


def test_loss_components_add_up_and_regularizers_only_train():
    model = build(router_z_loss_weight=0.5, router_balance_loss_weight=0.5, router_entropy_loss_weight=0.5)
    batch = tiny_batch(4)
    labels = (torch.rand(4, 32, 32) > 0.5).float()
    model.train()
    outputs = model(**batch, labels=labels)
    parts = outputs.mask_loss + outputs.router_z_loss + outputs.router_balance_loss + outputs.router_entropy_loss
    torch.testing.assert_close(outputs.loss, parts)
    assert outputs.router_entropy_loss > 0 and outputs.router_z_loss > 0
    model.eval()
    with torch.no_grad():
        outputs = model(**batch, labels=labels)
    assert outputs.router_z_loss == 0 and outputs.router_balance_loss == 0 and outputs.router_entropy_loss == 0
    torch.testing.assert_close(outputs.loss, outputs.mask_loss)


def test_mask_loss_matches_bce_at_logit_resolution():
    model = build().eval()
    batch = tiny_batch(2)
    labels = torch.zeros(2, 64, 64)  # labels at twice the logits' resolution are area-averaged down
    labels[:, 8:25, 4:16] = 1.0
    with torch.no_grad():
        outputs = model(**batch, labels=labels)
    targets = torch.nn.functional.avg_pool2d(labels[:, None], 2)
    assert ((targets > 0) & (targets < 1)).any()  # soft targets on the rectangle's odd edge
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, targets)
    torch.testing.assert_close(outputs.mask_loss, expected)


@pytest.mark.parametrize(
    "switches, has_adapter, has_fusion",
    [
        (dict(use_sera_adapter=False, use_sera_fusion=False), False, False),  # the paper's baseline
        (dict(use_sera_adapter=True, use_sera_fusion=False), True, False),
        (dict(use_sera_adapter=True, use_sera_fusion=True), True, True),
        (dict(use_sera_adapter=False, use_sera_fusion=True), False, True),
    ],
)
def test_ablation_switches_change_the_parameter_set(switches, has_adapter, has_fusion):
    model = build(**switches).eval()
    names = {name for name, _ in model.named_parameters()}
    baseline_names = {name for name, _ in build(use_sera_adapter=False, use_sera_fusion=False).named_parameters()}
    adapter_names = {name for name in names if "sera_adapter" in name}
    fusion_names = {name for name in names if name.startswith("model.fusion.")}
    assert bool(adapter_names) == has_adapter
    assert bool(fusion_names) == has_fusion
    if has_adapter:  # one adapter per configured block, wrapped around the block's own MLP
        blocks = {int(name.split("encoder.layer.")[1].split(".")[0]) for name in adapter_names}
        assert blocks == {1, 3}
    # Switching SERA off removes exactly its modules; the encoders' own weights keep their names.
    plain = {name.replace(".base_layer.", ".") for name in names - adapter_names - fusion_names}
    assert plain == baseline_names
    with torch.no_grad():
        outputs = model(**tiny_batch(2))
    assert outputs.logits.shape == (2, 1, 32, 32)
    assert len(outputs.adapter_router_weights) == (2 if has_adapter else 0)
    assert len(outputs.fusion_router_weights) == (3 if has_fusion else 0)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_fusion_top_k_keeps_k_experts_per_sample(top_k):
    model = build(fusion_top_k=top_k, fusion_router_noise_std=1.0)
    batch = tiny_batch(4)
    for training in (True, False):
        model.train(training)
        outputs = model(**batch, labels=torch.rand(4, 32, 32))
        for weights in outputs.fusion_router_weights:
            assert ((weights > 0).sum(-1) == top_k).all()
            torch.testing.assert_close(weights.sum(-1), torch.ones(4))
        outputs.loss.backward()


def test_top_k_below_four_equals_dense_mixture_of_the_kept_experts():
    """Running experts only on the samples that chose them must equal mixing all experts with zero weights."""
    model = build(fusion_top_k=2).eval()
    fusion = model.model.fusion["0"]
    grid = torch.randn(5, 32, 8, 8)
    with torch.no_grad():
        sparse_output, decision = fusion(grid)
        dense = sum(
            decision.weights[:, i, None, None, None] * fusion.experts[name](grid)
            for i, name in enumerate(FUSION_EXPERT_NAMES)
        )
    torch.testing.assert_close(sparse_output, dense)


def depthwise_reference(grid: torch.Tensor, taps) -> torch.Tensor:
    """One fixed 3x3 filter on every channel, written out plainly (replicate padding), for comparison."""
    channels = grid.shape[1]
    kernel = torch.tensor(taps, dtype=grid.dtype).expand(channels, 1, 3, 3)
    return torch.nn.functional.conv2d(
        torch.nn.functional.pad(grid, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels
    )


def test_fixed_filter_experts_follow_the_design_formulas():
    """Check the boundary and shape experts (filters kept in a buffer, padding shared) against the formulas of
    design section 3 written out plainly, on both memory layouts the model feeds them."""
    fusion = build().eval().model.fusion["0"]
    boundary, shape = fusion.experts["boundary"], fusion.experts["shape"]
    grid = torch.randn(3, 32, 7, 9)
    grad_x, grad_y = depthwise_reference(grid, SOBEL_X), depthwise_reference(grid, SOBEL_Y)
    magnitude = torch.sqrt(grad_x.pow(2) + grad_y.pow(2) + 1e-6)
    with torch.no_grad():
        expected_boundary = grid + boundary.phi(boundary.proj(torch.cat((grid, magnitude, grad_x + grad_y), dim=1)))
        blurred, laplacian = depthwise_reference(grid, GAUSSIAN), depthwise_reference(grid, LAPLACIAN)
        expected_shape = grid + shape.phi(shape.proj(torch.cat((blurred, laplacian), dim=1)))
        for layout in (torch.contiguous_format, torch.channels_last):
            laid_out = grid.contiguous(memory_format=layout)
            torch.testing.assert_close(boundary(laid_out), expected_boundary)
            torch.testing.assert_close(shape(laid_out), expected_shape)
            # The whole mixture does not depend on the layout either.
            torch.testing.assert_close(fusion(laid_out)[0], fusion(grid)[0])
    assert torch.allclose(torch.tensor(GAUSSIAN).sum(), torch.tensor(1.0))  # a blur keeps flat regions flat


def test_fixed_filters_are_rebuilt_on_load_and_not_saved(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    assert not any(key.endswith(".filters") for key in model.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        reloaded = SeraForReferringSegmentation.from_pretrained(tmp_path, dtype=dtype)
        for fusion in reloaded.model.fusion.values():
            # Every tap is exact in bf16, so whatever dtype they load in, the filters equal the float32 ones.
            assert torch.equal(fusion.experts["boundary"].filters.float(), fixed_filter_stack(BOUNDARY_FILTERS))
            assert torch.equal(fusion.experts["shape"].filters.float(), fixed_filter_stack(SHAPE_FILTERS))


@pytest.mark.parametrize("reads_sentence", [False, True])
def test_fusion_router_reads_the_sentence_only_when_asked(reads_sentence):
    """The paper's router sees only the image level, so (without the text-conditioned adapters in the vision tower)
    one image routes the same under any expression; `fusion_router_sentence=True` [ours] lets the expression in."""
    model = build(use_sera_adapter=False, fusion_router_sentence=reads_sentence).eval()
    config = model.config
    router = model.model.fusion["0"].router
    sentence_width = config.text_config.projection_dim or config.text_config.hidden_size
    assert router.fc1.in_features == config.vision_config.hidden_size + (sentence_width if reads_sentence else 0)
    batch, other_text = tiny_batch(2, seed=0), tiny_batch(2, seed=1)
    batch_with_other_text = {
        **batch,
        "input_ids": other_text["input_ids"],
        "attention_mask": other_text["attention_mask"],
    }
    with torch.no_grad():
        logits = model(**batch).fusion_router_logits
        logits_other_text = model(**batch_with_other_text).fusion_router_logits
    for level, other in zip(logits, logits_other_text):
        assert torch.equal(level, other) != reads_sentence


def test_router_noise_only_in_training():
    model = build(fusion_top_k=2, fusion_router_noise_std=5.0)
    batch = tiny_batch(4)
    model.eval()
    with torch.no_grad():
        first = model(**batch).fusion_router_weights[0]
        second = model(**batch).fusion_router_weights[0]
    torch.testing.assert_close(first, second)
    model.train()
    torch.manual_seed(0)
    noisy = [model(**batch).fusion_router_weights[0].detach() for _ in range(3)]
    assert not all(torch.equal(noisy[0], other) for other in noisy[1:])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(adapter_layers=[1, 7]), "do not exist in the 4-block vision backbone"),
        (dict(adapter_layers=[-1]), "do not exist"),
        (dict(fusion_top_k=5), "fusion_top_k"),
        (dict(fusion_top_k=0), "fusion_top_k"),
        (dict(vision_feature_layers=[2, 3]), "vision_feature_layers"),
        (dict(vision_feature_layers=[3, 2, 4]), "vision_feature_layers"),
        (dict(fusion_levels=[3]), "fusion_levels"),
        (dict(vision_config=dict(model_type="vit")), "not supported"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_sera_config(**overrides)


# The sizes and the threshold are the processor's; where the processor meets the model, a misfit is one clear line.
@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(image_size=30, max_text_length=8), "image_size=30 must be a multiple of the vision patch size 4"),
        (dict(image_size=32, max_text_length=40), "max_text_length=40 exceeds .* max_position_embeddings=16"),
    ],
)
def test_processor_sizes_that_do_not_fit_the_model_raise_value_error_naming_the_setting(sizes, message):
    with pytest.raises(ValueError, match=message):
        check_processor_fits(tiny_sera_config(), **sizes)
    check_processor_fits(tiny_sera_config(), image_size=32, max_text_length=16)


def test_invalid_mask_threshold_raises_value_error_naming_the_setting():
    with pytest.raises(ValueError, match="mask_threshold"):
        SeraImageProcessor(mask_threshold=1.5)


def test_expressions_longer_than_the_text_position_table_raise_one_clear_line():
    model = build().eval()
    batch = tiny_batch(2, length=20)  # the tiny text tower has 16 positions
    with pytest.raises(ValueError, match=r"input_ids hold 20 tokens but the text tower has 16 positions") as error:
        model(**batch)
    assert "\n" not in str(error.value) and "max_text_length <= 16" in str(error.value)


def test_a_config_saved_with_the_processor_s_settings_still_loads_and_drops_them(tmp_path):
    # Configs written by earlier versions carried image_size, max_text_length and mask_threshold, whose one home is
    # the processor now: they load, the keys are dropped, and saving writes them no more.
    saved = tiny_sera_config().to_dict()
    saved.update(image_size=64, max_text_length=12, mask_threshold=0.4)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = SeraConfig.from_pretrained(tmp_path)
    for key in ("image_size", "max_text_length", "mask_threshold"):
        assert not hasattr(config, key), key
    assert config.to_dict() == tiny_sera_config().to_dict() | {"transformers_version": config.transformers_version}
    config.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert not {"image_size", "max_text_length", "mask_threshold"} & set(resaved)
    assert SeraConfig(image_size=64).to_dict() == SeraConfig().to_dict()


def test_disabled_modules_skip_validation_of_their_settings():
    config = tiny_sera_config(use_sera_adapter=False, adapter_layers=[99], use_sera_fusion=False, fusion_top_k=9)
    assert config.adapter_layers == [99]


def test_bad_tensor_inputs_raise_clear_errors(tiny_config):
    model = SeraForReferringSegmentation(tiny_config).eval()
    batch = tiny_batch(2)
    with pytest.raises(ValueError, match="one expression per image"):
        model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"][:1])
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(pixel_values=torch.randn(2, 3, 30, 30), input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(pixel_values=torch.randn(2, 1, 32, 32), input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="labels must have shape"):
        model(**batch, labels=torch.zeros(2, 2, 2, 32, 32))


def test_config_round_trip_keeps_every_sera_setting(tmp_path):
    config = tiny_sera_config(fusion_top_k=3, adapter_scale=0.5, router_entropy_loss_weight=0.0)
    config.save_pretrained(tmp_path)
    reloaded = SeraConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.vision_config.model_type == "dinov2_with_registers"


def test_default_config_is_the_papers_real_size_model():
    config = SeraConfig()
    assert config.vision_config.model_type == "dinov2_with_registers"
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (768, 12)
    assert (config.vision_config.patch_size, config.vision_config.num_register_tokens) == (14, 4)
    # The input size is the processor's: the paper's 448 px letterbox gives the 32x32 grid of its DINOv2-B/14.
    assert SeraImageProcessor().size.height // config.vision_patch_size == 32
    assert not hasattr(config, "image_size") and not hasattr(config, "max_text_length")
    assert (config.text_config.hidden_size, config.text_config.projection_dim) == (512, 512)
    assert config.adapter_layers == [1, 3, 5, 7, 9, 11] and config.fusion_top_k == 4
    assert SeraConfig.from_pretrained(REPO_ROOT / "hub_configs" / "sera-refcoco").to_dict()["adapter_dim"] == 128


@pytest.mark.parametrize(
    "vision_config",
    [
        dict(
            model_type="dinov2",
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=4,
            image_size=32,
        ),
        dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            patch_size=4,
            image_size=32,
        ),
    ],
)
def test_other_vision_backbones(vision_config):
    model = build(vision_config=vision_config).eval()
    assert model.config.num_special_vision_tokens == 1
    with torch.no_grad():
        outputs = model(**tiny_batch(2))
    assert outputs.logits.shape == (2, 1, 32, 32)
    assert len(outputs.adapter_router_weights) == 2


def test_freeze_encoders_leaves_norms_biases_adapters_and_head_trainable():
    model = build()
    model.freeze_encoders()
    for name, param in model.named_parameters():
        in_encoder = name.startswith(("model.vision_model.", "model.text_model."))
        expected = (
            not in_encoder
            or "sera_adapter" in name
            or name.endswith(".bias")
            or any(norm in name for norm in ("norm1.", "norm2.", "layernorm.", "layer_norm", "final_layer_norm"))
        )
        assert param.requires_grad == expected, name
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    assert any("attention.q_proj.weight" in name for name in frozen)
    assert any("embeddings.patch_embeddings.projection.weight" in name for name in frozen)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = tiny_batch(2)
    labels = torch.rand(2, 32, 32)
    gradients = []
    for checkpointing in (False, True):
        model = build(seed=1, fusion_router_noise_std=0.0)
        model.freeze_encoders()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.vision_model.encoder.layer[0].gradient_checkpointing
            assert model.model.decoder.layers[0].gradient_checkpointing
        model(**batch, labels=labels).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_run_and_stay_close(dtype):
    model = build().eval()
    batch = tiny_batch(2)
    with torch.no_grad():
        reference = model(**batch).logits
        half = model.to(dtype)(**batch).logits
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=0.1, rtol=0.1)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("mode", ["bf16 weights", "bf16 autocast"])
def test_bf16_on_the_gpu_matches_fp32_on_the_cpu(mode):
    model = build().eval()
    batch = tiny_batch(4)
    with torch.no_grad():
        reference = model(**batch).logits
        gpu_batch = {name: value.to("cuda") for name, value in batch.items()}
        if mode == "bf16 weights":
            logits = model.to("cuda", torch.bfloat16)(**gpu_batch).logits
            assert logits.dtype == torch.bfloat16
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model.to("cuda")(**gpu_batch).logits
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits.float().cpu(), reference, atol=0.1, rtol=0.1)
    masks_agree = ((logits.float().cpu() > 0) == (reference > 0)).float().mean()
    assert masks_agree > 0.97


@requires_cuda
def test_bf16_autocast_training_step_on_the_gpu():
    model = build(fusion_router_noise_std=0.0).to("cuda")
    model.freeze_encoders()
    model.train()
    batch = {name: value.to("cuda") for name, value in tiny_batch(4).items()}
    labels = (torch.rand(4, *batch["pixel_values"].shape[-2:], device="cuda") > 0.8).float()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model(**batch, labels=labels)
    assert outputs.loss.dtype == torch.float32 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    optimizer.step()
    trained = [name for name, parameter in model.named_parameters() if parameter.grad is not None]
    assert len(trained) > 0.9 * sum(parameter.requires_grad for parameter in model.parameters())
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == (name in trained), name


def test_dice_loss_weight_adds_a_soft_dice_term():
    model = build()
    batch = tiny_batch(2)
    size = batch["pixel_values"].shape[-1]
    labels = torch.zeros(2, size, size)
    labels[:, : size // 2, : size // 3] = 1
    with torch.no_grad():
        logits = model(**batch).logits
        bce = model.mask_loss(logits, labels)
        model.config.dice_loss_weight = 0.5
        combined = model.mask_loss(logits, labels)
    targets = torch.nn.functional.interpolate(labels[:, None], size=logits.shape[-2:], mode="area").flatten(1)
    probabilities = logits.sigmoid().flatten(1)
    dice = 1 - (2 * (probabilities * targets).sum(-1) + 1) / (probabilities.sum(-1) + targets.sum(-1) + 1)
    torch.testing.assert_close(combined, bce + 0.5 * dice.mean())
    assert combined > bce
    with pytest.raises(ValueError, match="dice_loss_weight"):
        tiny_sera_config(dice_loss_weight=-1.0)


def test_sdpa_and_eager_encoders_agree():
    batch = tiny_batch(2)
    logits = []
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = tiny_sera_config()
        model = SeraForReferringSegmentation._from_config(config, attn_implementation=implementation).eval()
        assert model.model.vision_model.config._attn_implementation == implementation
        with torch.no_grad():
            logits.append(model(**batch).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)


def test_save_and_load_in_process(tmp_path):
    model = build().eval()
    batch = tiny_batch(2)
    model.save_pretrained(tmp_path)
    reloaded = SeraForReferringSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_remote_code_load_in_a_fresh_process_without_the_package(tmp_path):
    """A saved folder must load through AutoModel and AutoModelForImageSegmentation with trust_remote_code alone."""
    model = build().eval()
    batch = tiny_batch(2)
    with torch.no_grad():
        reference = model(**batch).logits
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_sera.SeraForReferringSegmentation"
    assert config["auto_map"]["AutoModelForImageSegmentation"] == "modeling_sera.SeraForReferringSegmentation"
    for name in ("modeling_sera.py", "configuration_sera.py", "sera_adapter.py", "sera_fusion.py", "sera_head.py"):
        assert (model_dir / name).is_file(), name
    torch.save({"batch": batch, "reference": reference}, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForImageSegmentation
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for auto_class in (AutoModel, AutoModelForImageSegmentation):
            model = auto_class.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
            assert type(model).__name__ == "SeraForReferringSegmentation", type(model)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                logits = model(**expected["batch"]).logits
            reference = expected["reference"]
            {ASSERT_LOGITS_CLOSE}  # fp32 bounds: see tests/helpers/cross_process.py
        assert not any(name.startswith("modeling_sera") for name in sys.modules), "the package was imported"
        print("REMOTE-CODE-OK")
        """
    )
    # Run from an empty folder; the script checks that only the copied remote code was imported.
    run_in_fresh_process(script, tmp_path, "REMOTE-CODE-OK")


def draw_overfit_samples():
    """Four 32x32 scenes with a square and a disc; each expression (one token) picks a different object."""
    images, masks, ids = torch.zeros(4, 3, 32, 32), torch.zeros(4, 32, 32), torch.ones(4, 8, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    for i in range(4):
        square = torch.zeros(32, 32, dtype=torch.bool)
        top, left = 3 + 4 * i, 2 + 3 * i
        square[top : top + 10, left : left + 10] = True
        disc = (yy - (26 - 3 * i)) ** 2 + (xx - (24 - 2 * i)) ** 2 <= 25
        disc &= ~square
        images[i, 0][square] = 2.0
        images[i, 2][disc] = 2.0
        target = square if i % 2 == 0 else disc
        masks[i][target] = 1.0
        ids[i, :3] = torch.tensor([0, 10 + i % 2, 1])  # BOS, "square" or "disc", EOS
    attention_mask = (torch.arange(8) < 3).long().expand(4, 8)
    return {"pixel_values": images, "input_ids": ids, "attention_mask": attention_mask}, masks


def test_tiny_model_overfits_four_samples_in_the_papers_regime():
    model = build(seed=0, decoder_dropout=0.0)
    model.freeze_encoders()
    batch, masks = draw_overfit_samples()
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=2e-3)
    reached = set()
    iou = torch.zeros(4)
    for step in range(1, 401):
        model.train()
        loss = model(**batch, labels=masks).loss
        optimizer.zero_grad()
        loss.backward()
        reached |= {name for name, param in trainable.items() if param.grad is not None and param.grad.abs().sum() > 0}
        optimizer.step()
        if step % 50 == 0:
            iou = masks_iou(model, batch, masks)
            if iou.min() > 0.95:
                break
    # Every trainable part received gradient: adapters, both routers, all fusion experts, neck, decoder, projector,
    # and the encoders' norm and bias terms.
    assert set(trainable) - reached == set()
    assert iou.min() > 0.9, iou


def masks_iou(model, batch, masks) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        predicted = model(**batch).logits.sigmoid()[:, 0] > SeraImageProcessor.mask_threshold
    target = masks > 0.5
    return (predicted & target).sum((1, 2)).float() / (predicted | target).sum((1, 2)).float()


def test_input_embeddings_are_the_text_tower_s_and_resize_token_embeddings_grows_the_vocabulary(tmp_path):
    model = build().eval()
    embeddings = model.model.text_model.get_input_embeddings()
    assert model.get_input_embeddings() is embeddings and model.model.get_input_embeddings() is embeddings
    old_rows = embeddings.weight.detach().clone()
    resized = model.resize_token_embeddings(TINY_TEXT_VOCAB + 5)
    assert resized.num_embeddings == TINY_TEXT_VOCAB + 5 and model.get_input_embeddings() is resized
    assert model.config.text_config.vocab_size == TINY_TEXT_VOCAB + 5
    assert torch.equal(resized.weight[:TINY_TEXT_VOCAB].detach(), old_rows)  # the old words keep their vectors
    batch = tiny_batch(2)
    batch["input_ids"][:, 1] = TINY_TEXT_VOCAB + 4  # a new word
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = SeraForReferringSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)


def test_full_fine_tuning_gives_every_parameter_a_gradient_and_mask_token_still_loads(tmp_path):
    """DDP with find_unused_parameters=False stops on a trainable parameter without a gradient; DINOv2's
    mask_token (masked-image pretraining only) must not be one, yet checkpoints keep and load it."""
    model = build()
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    batch = tiny_batch(2)
    model(**batch, labels=torch.rand(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).loss.backward()
    without_grad = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not without_grad, without_grad

    key = "model.vision_model.embeddings.mask_token"
    state = model.state_dict()
    assert key in state
    model.model.vision_model.embeddings.mask_token.fill_(0.5)
    model.save_pretrained(tmp_path)
    reloaded, info = SeraForReferringSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(reloaded.state_dict()[key], torch.full_like(state[key], 0.5))


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(use_reentrant):
    """The words must be inputs of each checkpoint: with use_reentrant=True a replayed adapted block would otherwise
    backpropagate into the text tower a second time ("Trying to backward through the graph a second time")."""
    model = build(fusion_router_noise_std=0.0).train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    batch, labels = (
        tiny_batch(2),
        torch.rand(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0)),
    )
    model(**batch, labels=labels).loss.backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    outputs = model(**batch, labels=labels)
    outputs.loss.backward()
    assert len(outputs.adapter_router_weights) == 2  # the router weights come back out of the checkpoints
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_projector_upsample_factor_sets_the_logits_grid_and_keeps_detris_layout_at_4(factor):
    config = tiny_sera_config(projector_upsample_factor=factor)
    model = SeraForReferringSegmentation(config).eval()
    batch = tiny_batch()
    labels = torch.zeros(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    labels[:, :4, :4] = 1
    outputs = model(**batch, labels=labels)
    grid = TINY_IMAGE_SIZE // config.vision_patch_size
    assert outputs.logits.shape == (2, 1, grid * factor, grid * factor)
    assert torch.isfinite(outputs.loss)
    convs = [
        name for name, module in model.projector.upsample.named_children() if isinstance(module, torch.nn.Sequential)
    ]
    upsamplings = [m for m in model.projector.upsample if isinstance(m, torch.nn.Upsample)]
    assert len(upsamplings) == {1: 0, 2: 1, 4: 2}[factor] and len(convs) == max(1, len(upsamplings))
    if factor == 4:  # DETRIS's x4 projector, module for module: older checkpoints load into it unchanged
        assert convs == ["1", "3"] and isinstance(model.projector.upsample[4], torch.nn.Conv2d)


def test_projector_upsample_factor_rejects_other_values():
    with pytest.raises(ValueError, match="projector_upsample_factor=3 must be 1, 2 or 4"):
        tiny_sera_config(projector_upsample_factor=3)
