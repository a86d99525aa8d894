"""`SeraTunerConfig`: which SERA modules the PEFT tuner injects into a SERA model, and what else it trains."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft.config import PeftConfig

from .configuration_sera import FUSION_NUM_EXPERTS


# The SeraConfig fields the tuner mirrors, by module; merge_and_unload copies them into the merged model's config.
SERA_ADAPTER_FIELDS = (
    "use_sera_adapter",
    "adapter_layers",
    "adapter_dim",
    "adapter_scale",
    "adapter_num_heads",
    "adapter_boundary_residual_scale",
    "adapter_spatial_residual_scale",
    "adapter_spatial_expert_weight",
    "adapter_boundary_expert_weight",
    "adapter_mask_padding",
)
SERA_FUSION_FIELDS = (
    "use_sera_fusion",
    "fusion_levels",
    "fusion_top_k",
    "fusion_router_noise_std",
    "fusion_router_noise",
    "fusion_router_hidden_size",
    "fusion_router_sentence",
    "fusion_spatial_init",
    "fusion_context_num_heads",
    "fusion_context_mlp_ratio",
)


class SeraPeftType(str, enum.Enum):
    """PEFT type of the SERA tuner.

    peft's own `PeftType` enum is closed, so SERA brings its own. Being a `str` enum like `PeftType`, it equals (and
    hashes like) the plain string "SERA" that adapter_config.json stores, and it has the `.value` that peft's messages
    and `get_model_status` read.
    """

    SERA = "SERA"


@dataclass
class SeraTunerConfig(PeftConfig):
    """
    Configuration of [`SeraTunerModel`]: SERA as a PEFT method.

    Applied to a [`SeraForReferringSegmentation`], the tuner injects SERA-Adapters into the vision blocks listed in
    `adapter_layers` and a SERA-Fusion at each level listed in `fusion_levels`, and trains the paper's set: those
    modules, the encoders' LayerNorm and bias terms and the segmentation head (neck, decoder, projector, word_proj).
    Everything else stays frozen. A base model that already has SERA modules (a published SERA checkpoint) keeps them
    and trains them in place; the tuner's settings must then equal the checkpoint's, which
    [`SeraTunerConfig.from_sera_config`] copies.

    The module settings mirror [`SeraConfig`]'s fields of the same names and defaults.

    Args:
        use_sera_adapter (`bool`, defaults to `True`): Inject SERA-Adapters into the blocks in `adapter_layers`.
        adapter_layers (`list[int]`, defaults to `[1, 3, 5, 7, 9, 11]`): 0-based vision blocks to adapt.
        adapter_dim, adapter_scale, adapter_num_heads, adapter_boundary_residual_scale, adapter_spatial_residual_scale,
        adapter_spatial_expert_weight, adapter_boundary_expert_weight, adapter_mask_padding: As in [`SeraConfig`].
        use_sera_fusion (`bool`, defaults to `True`): Inject a SERA-Fusion at each level in `fusion_levels`.
        fusion_levels (`list[int]`, defaults to `[0, 1, 2]`): Indices into the model's `vision_feature_layers`.
        fusion_top_k, fusion_router_noise_std, fusion_router_noise, fusion_router_hidden_size, fusion_router_sentence,
        fusion_spatial_init, fusion_context_num_heads, fusion_context_mlp_ratio: As in [`SeraConfig`].
        train_encoder_norms_and_biases (`bool`, defaults to `True`):
            Train every LayerNorm and every bias term of both encoders (the paper: "<1% of backbone parameters").
        train_head (`bool`, defaults to `True`):
            Train the neck, decoder, projector and word projection.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraTunerConfig

    >>> baseline = SeraForReferringSegmentation(SeraConfig(use_sera_adapter=False, use_sera_fusion=False))
    >>> model = get_peft_model(baseline, SeraTunerConfig())
    >>> model.print_trainable_parameters()
    ```
    """

    use_sera_adapter: bool = field(default=True, metadata={"help": "Inject SERA-Adapters into the vision blocks."})
    adapter_layers: list[int] = field(
        default_factory=lambda: [1, 3, 5, 7, 9, 11], metadata={"help": "0-based vision blocks that get an adapter."}
    )
    adapter_dim: int = field(default=128, metadata={"help": "Inner width d of a SERA-Adapter."})
    adapter_scale: float = field(default=0.2, metadata={"help": "s in mlp(x) + s * adapter(x, words)."})
    adapter_num_heads: int = field(default=8, metadata={"help": "Heads of the adapter's cross-attention to words."})
    adapter_boundary_residual_scale: float = field(default=0.1, metadata={"help": "Boundary expert residual scale."})
    adapter_spatial_residual_scale: float = field(default=0.3, metadata={"help": "Spatial expert residual scale."})
    adapter_spatial_expert_weight: float = field(default=0.25, metadata={"help": "Weight of the spatial expert."})
    adapter_boundary_expert_weight: float = field(default=0.15, metadata={"help": "Weight of the boundary expert."})
    adapter_mask_padding: bool = field(default=True, metadata={"help": "Mask padded words in the cross-attention."})

    use_sera_fusion: bool = field(default=True, metadata={"help": "Inject a SERA-Fusion at the chosen levels."})
    fusion_levels: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Indices into vision_feature_layers that get a fusion."}
    )
    fusion_top_k: int = field(default=4, metadata={"help": "Experts kept per sample by the fusion router (1 to 4)."})
    fusion_router_noise_std: float = field(default=1.0, metadata={"help": "Router logit noise while training."})
    fusion_router_noise: str = field(
        default="always", metadata={"help": "[ours] 'always' (the paper) or 'sparse_only': noise only when K < 4."}
    )
    fusion_router_hidden_size: int = field(default=192, metadata={"help": "Hidden width of the fusion router."})
    fusion_router_sentence: bool = field(
        default=False, metadata={"help": "[ours] The fusion routers also read the sentence feature."}
    )
    fusion_spatial_init: float = field(default=0.1, metadata={"help": "Initial scale of the spatial expert."})
    fusion_context_num_heads: int = field(default=8, metadata={"help": "Heads of the context expert."})
    fusion_context_mlp_ratio: float = field(default=4.0, metadata={"help": "FFN ratio of the context expert."})

    train_encoder_norms_and_biases: bool = field(
        default=True, metadata={"help": "Train the LayerNorm and bias terms of both encoders."}
    )
    train_head: bool = field(default=True, metadata={"help": "Train the neck, decoder, projector and word_proj."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SeraPeftType.SERA
        # JSON and user code may hand over tuples or numpy ints; the merged SeraConfig wants plain int lists.
        self.adapter_layers = [int(index) for index in self.adapter_layers]
        self.fusion_levels = [int(index) for index in self.fusion_levels]
        self.check_settings()

    def check_settings(self) -> None:
        """Raise a `ValueError` naming the setting for what can be judged without the base model; the rest (block
        and level indices, widths) is checked by the tuner against the model it is applied to."""
        if self.use_sera_adapter:
            if not self.adapter_layers:
                raise ValueError("use_sera_adapter=True needs at least one block index in adapter_layers.")
            if len(set(self.adapter_layers)) != len(self.adapter_layers):
                raise ValueError(f"adapter_layers {self.adapter_layers} lists a block twice.")
            if self.adapter_num_heads < 1 or self.adapter_dim % self.adapter_num_heads:
                raise ValueError(
                    f"adapter_num_heads={self.adapter_num_heads} must divide adapter_dim={self.adapter_dim}."
                )
        if self.use_sera_fusion:
            if not self.fusion_levels:
                raise ValueError("use_sera_fusion=True needs at least one level index in fusion_levels.")
            if len(set(self.fusion_levels)) != len(self.fusion_levels):
                raise ValueError(f"fusion_levels {self.fusion_levels} lists a level twice.")
            if not 1 <= self.fusion_top_k <= FUSION_NUM_EXPERTS:
                raise ValueError(f"fusion_top_k={self.fusion_top_k} must be between 1 and {FUSION_NUM_EXPERTS}.")
        trained = (self.use_sera_adapter, self.use_sera_fusion, self.train_encoder_norms_and_biases, self.train_head)
        if not any(trained):
            raise ValueError(
                "This SeraTunerConfig trains nothing: switch on at least one of use_sera_adapter, use_sera_fusion, "
                "train_encoder_norms_and_biases and train_head."
            )

    @classmethod
    def from_sera_config(cls, sera_config, **overrides) -> SeraTunerConfig:
        """The tuner settings that match a [`SeraConfig`] (e.g. a published checkpoint's), with `overrides` on top."""
        settings = {name: getattr(sera_config, name) for name in SERA_ADAPTER_FIELDS + SERA_FUSION_FIELDS}
        return cls(**{**settings, **overrides})

    def sera_settings(self) -> dict:
        """The SeraConfig fields this tuner sets, as a model built with its modules would have them."""
        return {name: getattr(self, name) for name in SERA_ADAPTER_FIELDS + SERA_FUSION_FIELDS}


__all__ = ["SERA_ADAPTER_FIELDS", "SERA_FUSION_FIELDS", "SeraPeftType", "SeraTunerConfig"]
