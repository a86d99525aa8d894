"""SERA model configuration."""

from dataclasses import field

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)

SUPPORTED_VISION_MODEL_TYPES = ("dinov2_with_registers", "dinov2", "clip_vision_model")
SUPPORTED_TEXT_MODEL_TYPES = ("clip_text_model",)
FUSION_NUM_EXPERTS = 4  # spatial, context, boundary, shape
# SeraProcessor's settings (letterbox side, tokens per expression, mask threshold), which configs saved by earlier
# versions also carried; loading such a config drops them, so the processor stays their one home.
PROCESSOR_KEYS = ("image_size", "max_text_length", "mask_threshold")


class SeraConfig(PreTrainedConfig):
    r"""
    Configuration of a SERA (Spatio-Semantic Expert Routing Architecture) referring segmentation model.

    The defaults are the paper's real-size model: a DINOv2-B/14 with 4 registers, a CLIP ViT-B/16 text tower,
    SERA-Adapters in blocks 1, 3, 5, 7, 9, 11 and a SERA-Fusion with top-4 routing at every vision level.
    Settings the paper leaves open are marked *[ours]* below; each is a field so that the paper's ablations can be
    reproduced by switching it. What the inputs look like (the 448 px letterbox, tokens per expression) and the mask
    threshold are [`SeraProcessor`]'s settings, not the config's: the model takes any multiple of the patch size and
    any expression length up to the text tower's `max_position_embeddings`.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision backbone config: `dinov2_with_registers` (default), `dinov2` or `clip_vision_model`.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Text tower config (`clip_text_model`). Its `projection_dim` is the sentence-feature width.
        use_sera_adapter (`bool`, *optional*, defaults to `True`):
            Build SERA-Adapters inside the vision blocks listed in `adapter_layers`. `False` with
            `use_sera_fusion=False` is the paper's baseline.
        use_sera_fusion (`bool`, *optional*, defaults to `True`):
            Build a SERA-Fusion for each vision level listed in `fusion_levels`.
        adapter_layers (`list[int]`, *optional*, defaults to `[1, 3, 5, 7, 9, 11]`):
            0-based indices of the vision blocks that receive a SERA-Adapter *[ours]*.
        adapter_dim (`int`, *optional*, defaults to 128):
            Inner width `d` of a SERA-Adapter *[ours]*.
        adapter_scale (`float`, *optional*, defaults to 0.2):
            `s` in `mlp(norm2(x)) + s * adapter(norm2(x), words)` *[ours]*.
        adapter_num_heads (`int`, *optional*, defaults to 8):
            Heads of the adapter's cross-attention to the words.
        adapter_boundary_residual_scale (`float`, *optional*, defaults to 0.1):
            Boundary expert, `ReLU(BN(G + 0.1 * DWConv(G)))`.
        adapter_spatial_residual_scale (`float`, *optional*, defaults to 0.3):
            Spatial expert, `ReLU(BN(DWConv(G))) + 0.3 * G`.
        adapter_spatial_expert_weight (`float`, *optional*, defaults to 0.25):
            Weight of the routed spatial expert in `G_corr`.
        adapter_boundary_expert_weight (`float`, *optional*, defaults to 0.15):
            Weight of the routed boundary expert in `G_corr`.
        adapter_mask_padding (`bool`, *optional*, defaults to `True`):
            Mask padded words in the adapter's cross-attention *[ours]*.
        fusion_levels (`list[int]`, *optional*, defaults to `[0, 1, 2]`):
            Indices into `vision_feature_layers` of the levels that get a SERA-Fusion *[ours: one per level]*.
        fusion_top_k (`int`, *optional*, defaults to 4):
            Experts kept per sample by the SERA-Fusion router (1 to 4).
        fusion_router_noise_std (`float`, *optional*, defaults to 1.0):
            Std of the Gaussian noise added to the router logits during training *[ours]*.
        fusion_router_noise (`str`, *optional*, defaults to `"always"`):
            When the router noise is added *[ours]*: `"always"` while training (the paper's noisy top-K), or
            `"sparse_only"`, only when `fusion_top_k` is below the number of experts. With all four experts kept the
            noise selects nothing and only jitters the weights: std 1.0 against clean logits that differ by about
            0.01 across samples (BENCHMARKS.md) leaves the weights noise.
        fusion_router_hidden_size (`int`, *optional*, defaults to 192):
            Hidden width of the two-layer router `W2 GELU(W1 mean(X))` *[ours]*.
        fusion_router_sentence (`bool`, *optional*, defaults to `False`):
            *[ours, not in the paper]* The fusion routers also read the sentence feature:
            `W2 GELU(W1 [mean(X); s])`, so that the expression, not only the image, can choose the experts. `False`
            is the paper's router.
        fusion_spatial_init (`float`, *optional*, defaults to 0.1):
            Initial value of the learnable scale `a` of the spatial expert *[ours]*.
        fusion_context_num_heads (`int`, *optional*, defaults to 8):
            Heads of the context expert's transformer layer.
        fusion_context_mlp_ratio (`float`, *optional*, defaults to 4.0):
            FFN width of the context expert relative to the level width *[ours]*.
        router_z_loss_weight (`float`, *optional*, defaults to 1e-3):
            `lambda_z` of the router z-loss *[ours]*.
        router_balance_loss_weight (`float`, *optional*, defaults to 1e-2):
            `lambda_bal` of the load-balance loss *[ours]*.
        router_entropy_loss_weight (`float`, *optional*, defaults to 1e-3):
            Weight of the token-assignment regularizer, the mean entropy of the routing weights *[ours]*; 0 turns
            it off.
        router_loss_level_reduction (`str`, *optional*, defaults to `"mean"`):
            How the regularizers of the fused levels' routers combine *[ours]*: `"mean"` (each of the L routers gets
            lambda / L) or `"sum"` (each gets the full lambda).
        router_regularizer_weights (`str`, *optional*, defaults to `"noisy"`):
            Which routing weights the balance and entropy terms see *[ours]*: `"noisy"`, the weights the experts
            were mixed with (a perfectly balanced router still pays about 0.035 balance loss at batch 16, for the
            noise), or `"clean"`, the top-K softmax of the noise-free logits.
        vision_feature_layers (`list[int]`, *optional*, defaults to `[5, 9, 12]`):
            Levels taken after these many vision blocks (indices into transformers' `hidden_states`, whose entry 0
            is the embeddings); the last one must be the backbone depth and is taken after the backbone's final
            norm. The default is DETRIS's: after 0-based blocks 4 and 8 (`hidden_states[5]` and `[9]`) and the
            final norm. `[4, 8, 12]`, one block earlier, is what this package took up to 0.1.0.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the multimodal neck, decoder and sentence feature space.
        decoder_num_layers (`int`, *optional*, defaults to 3):
        decoder_num_heads (`int`, *optional*, defaults to 8):
        decoder_intermediate_size (`int`, *optional*, defaults to 2048):
        decoder_dropout (`float`, *optional*, defaults to 0.1):
        projector_dim (`int`, *optional*, defaults to 256):
            Channels of the upsampled map that the dynamic kernel convolves.
        projector_kernel_size (`int`, *optional*, defaults to 3):
            Size of the dynamic kernel generated from the sentence feature.
        projector_upsample_factor (`int`, *optional*, defaults to 4):
            How much the projector upsamples the decoder's grid before the dynamic kernel (1, 2 or 4; one bilinear x2
            and 3x3 conv-BN-ReLU per factor of 2). 4 is DETRIS's; *[ours]* a smaller factor for encoders whose grid
            is already fine relative to the objects, where the x4 map costs most of the head's FLOPs.
        dice_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of a soft Dice loss added to the mask BCE *[ours]*; 0 is the paper's BCE alone. Dice counts the
            referred object's pixels as much as the background's, which helps when objects cover a few percent of
            the image and training is short.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the truncated normal initialisation of SERA's own weights.

    Example:

    ```python
    >>> from modeling_sera import SeraConfig, SeraForReferringSegmentation

    >>> config = SeraConfig(use_sera_fusion=False)  # the "+ SERA-Adapter" ablation row
    >>> model = SeraForReferringSegmentation(config)
    ```
    """

    model_type = "sera"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="dinov2_with_registers",
            init_kwargs={"patch_size": 14, "image_size": 518, "num_register_tokens": 4},
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_text_model"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None

    use_sera_adapter: bool = True
    use_sera_fusion: bool = True

    adapter_layers: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 11])
    adapter_dim: int = 128
    adapter_scale: float = 0.2
    adapter_num_heads: int = 8
    adapter_boundary_residual_scale: float = 0.1
    adapter_spatial_residual_scale: float = 0.3
    adapter_spatial_expert_weight: float = 0.25
    adapter_boundary_expert_weight: float = 0.15
    adapter_mask_padding: bool = True

    fusion_levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    fusion_top_k: int = 4
    fusion_router_noise_std: float = 1.0
    fusion_router_noise: str = "always"
    fusion_router_hidden_size: int = 192
    fusion_router_sentence: bool = False
    fusion_spatial_init: float = 0.1
    fusion_context_num_heads: int = 8
    fusion_context_mlp_ratio: float = 4.0

    router_z_loss_weight: float = 1e-3
    router_balance_loss_weight: float = 1e-2
    router_entropy_loss_weight: float = 1e-3
    router_loss_level_reduction: str = "mean"
    router_regularizer_weights: str = "noisy"

    vision_feature_layers: list[int] = field(default_factory=lambda: [5, 9, 12])
    hidden_size: int = 512
    decoder_num_layers: int = 3
    decoder_num_heads: int = 8
    decoder_intermediate_size: int = 2048
    decoder_dropout: float = 0.1
    projector_dim: int = 256
    projector_kernel_size: int = 3
    projector_upsample_factor: int = 4

    dice_loss_weight: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Older configs also carried the processor's settings; SeraProcessor is their only home now.
        for key in PROCESSOR_KEYS:
            kwargs.pop(key, None)
        super().__post_init__(**kwargs)
        self.adapter_layers = [int(i) for i in self.adapter_layers]
        self.fusion_levels = [int(i) for i in self.fusion_levels]
        self.vision_feature_layers = [int(i) for i in self.vision_feature_layers]
        self.check_settings()

    @property
    def num_vision_layers(self) -> int:
        return self.vision_config.num_hidden_layers

    @property
    def vision_patch_size(self) -> int:
        patch_size = self.vision_config.patch_size
        return patch_size if isinstance(patch_size, int) else patch_size[0]

    @property
    def num_special_vision_tokens(self) -> int:
        """CLS plus register tokens that precede the patch tokens in the vision sequence."""
        return 1 + getattr(self.vision_config, "num_register_tokens", 0)

    def check_settings(self) -> None:
        """Raise a `ValueError` that names the offending setting when the configuration cannot be built."""
        vision_type = self.vision_config.model_type
        text_type = self.text_config.model_type
        if vision_type not in SUPPORTED_VISION_MODEL_TYPES:
            raise ValueError(
                f"vision_config.model_type={vision_type!r} is not supported; use one of {SUPPORTED_VISION_MODEL_TYPES}."
            )
        if text_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"text_config.model_type={text_type!r} is not supported; use one of {SUPPORTED_TEXT_MODEL_TYPES}."
            )
        depth = self.num_vision_layers
        if self.use_sera_adapter:
            if not self.adapter_layers:
                raise ValueError("use_sera_adapter=True needs at least one block index in adapter_layers.")
            missing = [i for i in self.adapter_layers if not 0 <= i < depth]
            if missing:
                raise ValueError(
                    f"adapter_layers {missing} do not exist in the {depth}-block vision backbone; "
                    f"use 0-based block indices in [0, {depth - 1}]."
                )
            if len(set(self.adapter_layers)) != len(self.adapter_layers):
                raise ValueError(f"adapter_layers {self.adapter_layers} lists a block twice.")
        levels = self.vision_feature_layers
        if not levels or sorted(set(levels)) != levels or levels[0] < 1 or levels[-1] != depth:
            raise ValueError(
                f"vision_feature_layers={levels} must be strictly increasing block counts in [1, {depth}] "
                f"ending with the backbone depth {depth} (the last level is taken after the final norm)."
            )
        if self.use_sera_fusion:
            bad_levels = [i for i in self.fusion_levels if not 0 <= i < len(levels)]
            if not self.fusion_levels or bad_levels:
                raise ValueError(
                    f"fusion_levels={self.fusion_levels} must be indices into vision_feature_layers "
                    f"(0 to {len(levels) - 1})."
                )
            for name, value, allowed in (
                ("fusion_router_noise", self.fusion_router_noise, ("always", "sparse_only")),
                ("router_loss_level_reduction", self.router_loss_level_reduction, ("mean", "sum")),
                ("router_regularizer_weights", self.router_regularizer_weights, ("noisy", "clean")),
            ):
                if value not in allowed:
                    raise ValueError(f"{name}={value!r} must be one of {allowed}.")
            if not 1 <= self.fusion_top_k <= FUSION_NUM_EXPERTS:
                raise ValueError(f"fusion_top_k={self.fusion_top_k} must be between 1 and {FUSION_NUM_EXPERTS}.")
            if self.vision_config.hidden_size % self.fusion_context_num_heads:
                raise ValueError(
                    f"fusion_context_num_heads={self.fusion_context_num_heads} must divide the vision width "
                    f"{self.vision_config.hidden_size}."
                )
        if self.use_sera_adapter and self.adapter_dim % self.adapter_num_heads:
            raise ValueError(f"adapter_num_heads={self.adapter_num_heads} must divide adapter_dim={self.adapter_dim}.")
        if self.hidden_size % self.decoder_num_heads:
            raise ValueError(f"decoder_num_heads={self.decoder_num_heads} must divide hidden_size={self.hidden_size}.")
        if self.projector_upsample_factor not in (1, 2, 4):
            raise ValueError(f"projector_upsample_factor={self.projector_upsample_factor} must be 1, 2 or 4.")
        if self.dice_loss_weight < 0:
            raise ValueError(f"dice_loss_weight={self.dice_loss_weight} must be >= 0 (0 turns the Dice loss off).")


__all__ = ["SeraConfig"]
