"""PyTorch SERA: referring image segmentation with spatio-semantic expert routing.

Data flows one way: image + expression -> encoders (with SERA-Adapters inside the vision blocks) -> level grids ->
SERA-Fusion -> neck -> decoder -> projector -> mask logits.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, CLIPTextModelWithProjection, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_sera import SeraConfig
from .sera_adapter import SeraAdaptedMLP, SeraAdapter, SeraVisionContext, checkpoint_with_words, sera_vision_scope
from .sera_fusion import (
    SeraFusion,
    SeraFusionBoundaryExpert,
    SeraFusionShapeExpert,
    SeraFusionSpatialExpert,
    fixed_filter_stack,
)
from .sera_head import SeraDecoder, SeraNeck, SeraProjector
from .sera_parameters import load_encoder_weights, set_trainable, trained_key_prefixes
from .sera_routing import router_balance_loss, router_entropy_loss, router_z_loss, top_k_softmax


logger = logging.get_logger(__name__)

# The inputs of SERA's forward that the processor makes (labels aside): what pipelines, evaluation and collation pass.
MODEL_INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask")

AUTO_MAP = {
    "AutoConfig": "configuration_sera.SeraConfig",
    "AutoModel": "modeling_sera.SeraForReferringSegmentation",
    "AutoModelForImageSegmentation": "modeling_sera.SeraForReferringSegmentation",
}


@dataclass
class SeraModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size, height, width)`):
        Decoded multimodal grid at the vision patch resolution.
    sentence_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        Projected sentence feature (the text tower's EOT token).
    adapter_router_weights (`tuple(torch.FloatTensor)`):
        One `(batch_size, 2)` tensor per adapted vision block: soft weights of the [spatial, boundary] experts.
    fusion_router_weights (`tuple(torch.FloatTensor)`):
        One `(batch_size, 4)` tensor per fused level: weights of the [spatial, context, boundary, shape] experts,
        zero for the experts outside the sample's top-K.
    fusion_router_logits (`tuple(torch.FloatTensor)`):
        The clean (noise-free) router logits matching `fusion_router_weights`.
    vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The level grids `(batch_size, vision_width, height, width)` after SERA-Fusion, when `output_hidden_states`.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The vision tower's hidden states `(batch_size, num_tokens, vision_width)`, when `output_hidden_states`: the
        embeddings' output, then one per block (SERA-Adapters included), as transformers' vision models give them.
    """

    last_hidden_state: torch.FloatTensor | None = None
    sentence_embeds: torch.FloatTensor | None = None
    adapter_router_weights: tuple[torch.FloatTensor, ...] | None = None
    fusion_router_weights: tuple[torch.FloatTensor, ...] | None = None
    fusion_router_logits: tuple[torch.FloatTensor, ...] | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SeraReferringSegmentationOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
        `mask_loss + router_z_loss + router_balance_loss + router_entropy_loss`.
    logits (`torch.FloatTensor` of shape `(batch_size, 1, height, width)`):
        Mask logits over the whole letterboxed input at 1/4 of its resolution; the processor's
        `post_process_referring_segmentation` maps them back to the original image.
    mask_loss (`torch.FloatTensor`, *optional*):
        Binary cross-entropy with logits against the labels resized to the logits' resolution, plus
        `config.dice_loss_weight` times a soft Dice loss when that weight is positive.
    router_z_loss, router_balance_loss, router_entropy_loss (`torch.FloatTensor`, *optional*):
        The weighted MoE regularizers of the SERA-Fusion routers (zero without SERA-Fusion), in training mode.
    adapter_router_weights, fusion_router_weights, fusion_router_logits, vision_hidden_states, hidden_states:
        See [`SeraModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    mask_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    router_balance_loss: torch.FloatTensor | None = None
    router_entropy_loss: torch.FloatTensor | None = None
    adapter_router_weights: tuple[torch.FloatTensor, ...] | None = None
    fusion_router_weights: tuple[torch.FloatTensor, ...] | None = None
    fusion_router_logits: tuple[torch.FloatTensor, ...] | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def sentence_width(config: SeraConfig) -> int:
    """Width of the sentence feature (the text tower's projected pooled output) that the neck, the projector and a
    sentence-aware fusion router read."""
    return config.text_config.projection_dim or config.text_config.hidden_size


def vision_blocks(vision_model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a DINOv2 (with or without registers) or CLIP vision tower."""
    encoder = vision_model.encoder
    for attribute in ("layer", "layers"):  # DINOv2 names them `layer`, CLIP `layers`
        if isinstance(getattr(encoder, attribute, None), nn.ModuleList):
            return getattr(encoder, attribute)
    raise TypeError(f"Cannot find the transformer blocks of {type(vision_model).__name__}.")


def selected_hidden_states(hidden_states: tuple, output_hidden_states) -> tuple | None:
    """The vision tower's hidden states as `output_hidden_states` asks for them: all (`True`), none (`False`), or,
    given a list of indices (negative ones counting from the end), those and `None` in the other places."""
    if isinstance(output_hidden_states, (list, tuple)):
        kept = {index % len(hidden_states) for index in output_hidden_states}
        return tuple(state if index in kept else None for index, state in enumerate(hidden_states))
    return tuple(hidden_states) if output_hidden_states else None


def freeze_unused_mask_token(vision_model: nn.Module) -> None:
    """Turn DINOv2's `embeddings.mask_token` from a parameter into a (saved) buffer.

    DINOv2 uses it only for masked-image pretraining (`bool_masked_pos`), which SERA never passes: as a parameter it
    would get no gradient under full fine-tuning, and DDP with `find_unused_parameters=False` (Accelerate's default)
    stops at the first step with an unused-parameter error. A persistent buffer keeps its state-dict name, so
    checkpoints and pretrained DINOv2 weights load into it as before, but no optimizer or DDP reducer sees it.
    """
    embeddings = getattr(vision_model, "embeddings", None)
    mask_token = getattr(embeddings, "mask_token", None)
    if isinstance(mask_token, nn.Parameter):
        del embeddings.mask_token
        embeddings.register_buffer("mask_token", mask_token.detach(), persistent=True)


def vision_model_class(model_type: str) -> type:
    """The class that loads a vision tower of this `model_type`: `AutoModel` would build a whole CLIP (text tower
    included) from a CLIP checkpoint, so CLIP's vision tower is loaded as `CLIPVisionModel`."""
    return CLIPVisionModel if model_type in ("clip", "clip_vision_model") else AutoModel


def build_vision_model(vision_config) -> nn.Module:
    model_class = vision_model_class(vision_config.model_type)
    return model_class(vision_config) if model_class is CLIPVisionModel else AutoModel.from_config(vision_config)


class SeraPreTrainedModel(PreTrainedModel):
    config: SeraConfig
    config_class = SeraConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SeraFusion", "SeraDecoderLayer", "SeraAdaptedMLP"]

    @torch.no_grad()
    def _init_weights(self, module):
        # The encoders are sub-models and initialise themselves (SERA-Adapters inside them included).
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, SeraFusionSpatialExpert):
            init.constant_(module.scale, module.initial_scale)
        elif isinstance(module, (SeraFusionBoundaryExpert, SeraFusionShapeExpert)):
            # Fixed filters live in non-persistent buffers: a checkpoint does not hold them, so rebuild them here.
            init.copy_(module.filters, fixed_filter_stack(module.fixed_filters))


class SeraModel(SeraPreTrainedModel):
    """Encoders, SERA-Adapters, SERA-Fusion, neck and decoder: everything up to the mask projector."""

    def __init__(self, config: SeraConfig):
        super().__init__(config)
        self.vision_model = build_vision_model(config.vision_config)
        freeze_unused_mask_token(self.vision_model)
        self.text_model = CLIPTextModelWithProjection(config.text_config)
        vision_width = config.vision_config.hidden_size
        text_width = config.text_config.hidden_size
        sentence_dim = sentence_width(config)

        if config.use_sera_adapter:
            blocks = vision_blocks(self.vision_model)
            for index in config.adapter_layers:
                adapter = SeraAdapter.from_settings(vision_width, text_width, config)
                blocks[index].mlp = SeraAdaptedMLP(blocks[index].mlp, adapter, config.adapter_scale)

        self.fusion = nn.ModuleDict()
        if config.use_sera_fusion:
            for level in config.fusion_levels:
                self.fusion[str(level)] = SeraFusion.from_settings(vision_width, config, sentence_dim)

        self.word_proj = (
            nn.Linear(text_width, config.hidden_size) if text_width != config.hidden_size else nn.Identity()
        )
        self.neck = SeraNeck([vision_width] * len(config.vision_feature_layers), sentence_dim, config.hidden_size)
        self.decoder = SeraDecoder(
            config.hidden_size,
            config.decoder_num_layers,
            config.decoder_num_heads,
            config.decoder_intermediate_size,
            config.decoder_dropout,
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings: the only input embeddings SERA has (its images enter as pixels), so
        `resize_token_embeddings` grows the vocabulary of the text tower, whose config holds the new size."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def adapted_mlps(self) -> list[SeraAdaptedMLP]:
        """Every module in the vision tower that needs the words; found each call, since PEFT can inject them."""
        return [module for module in self.vision_model.modules() if getattr(module, "reads_sera_words", False)]

    def _pass_words_to_checkpoints(self) -> None:
        """Under gradient checkpointing, make the words inputs of every adapted block's checkpoint (see
        `checkpoint_with_words`); checkpointing may have been enabled, or adapters injected, since the last call."""
        for block in vision_blocks(self.vision_model):
            function = getattr(block, "_gradient_checkpointing_func", None)
            if function is None or not getattr(block, "gradient_checkpointing", False):
                continue
            if any(getattr(module, "reads_sera_words", False) for module in block.modules()):
                block._gradient_checkpointing_func = checkpoint_with_words(function)

    def _check_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> None:
        if pixel_values is None or input_ids is None:
            raise ValueError("SERA needs both pixel_values and input_ids; build them with SeraProcessor.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}."
            )
        patch = self.config.vision_patch_size
        if pixel_values.shape[-2] % patch or pixel_values.shape[-1] % patch:
            raise ValueError(
                f"pixel_values height and width {tuple(pixel_values.shape[-2:])} must be multiples of the patch "
                f"size {patch}; SeraProcessor letterboxes images to a square of such a side."
            )
        if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"input_ids must have shape (batch, length) with the batch of pixel_values ({pixel_values.shape[0]}), "
                f"got {tuple(input_ids.shape)}: give one expression per image."
            )
        # The processor sets the length (its max_text_length); the text tower's position table bounds it.
        positions = self.config.text_config.max_position_embeddings
        if input_ids.shape[1] > positions:
            raise ValueError(
                f"input_ids hold {input_ids.shape[1]} tokens but the text tower has {positions} positions "
                f"(text_config.max_position_embeddings); use a SeraProcessor with max_text_length <= {positions}."
            )

    def _vision_levels(self, vision_outputs, grid_height: int, grid_width: int) -> list[torch.Tensor]:
        """Level grids (B, C, H, W) after the configured block counts; the last after the final norm."""
        hidden_states = vision_outputs.hidden_states  # embeddings output, then one entry per block
        depth = self.config.num_vision_layers
        num_special = self.config.num_special_vision_tokens
        levels = []
        for blocks_passed in self.config.vision_feature_layers:
            if blocks_passed == depth:
                tokens = vision_outputs.last_hidden_state
                if isinstance(self.vision_model, CLIPVisionModel):  # CLIP normalises only its pooled token
                    tokens = self.vision_model.post_layernorm(tokens)
            else:
                tokens = hidden_states[blocks_passed]
            patches = tokens[:, num_special:].unflatten(1, (grid_height, grid_width))  # (B, H, W, C)
            # Channels-last, the tokens' own order: the context expert views it as tokens without a copy, and the
            # 1x1 convolutions of the neck take it as it is.
            levels.append(patches.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        return levels

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SeraModelOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        self._check_inputs(pixel_values, input_ids)
        pixel_values = pixel_values.to(self.dtype)

        text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        word_states = text_outputs.last_hidden_state
        sentence = text_outputs.text_embeds

        patch = self.config.vision_patch_size
        grid_height, grid_width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        adapted = self.adapted_mlps()
        context = SeraVisionContext(
            word_states=word_states,
            word_mask=attention_mask,
            grid_height=grid_height,
            grid_width=grid_width,
            num_special_tokens=self.config.num_special_vision_tokens,
        )
        self._pass_words_to_checkpoints()
        with sera_vision_scope(context) as scope:
            vision_outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        # Detached: for inspection only (no loss reads them), as the fusion routers' weights are not.
        recorded = [scope.router_weights.get(id(module)) for module in adapted]
        adapter_router_weights = tuple(weights.detach() if weights is not None else None for weights in recorded)

        levels = self._vision_levels(vision_outputs, grid_height, grid_width)
        fusion_weights, fusion_logits = [], []
        for index in range(len(levels)):
            if str(index) in self.fusion:
                levels[index], decision = self.fusion[str(index)](levels[index], sentence)
                fusion_weights.append(decision.weights)
                fusion_logits.append(decision.logits)

        grid = self.neck(levels, sentence)
        grid = self.decoder(grid, self.word_proj(word_states), attention_mask)

        output = SeraModelOutput(
            last_hidden_state=grid,
            sentence_embeds=sentence,
            adapter_router_weights=adapter_router_weights,
            fusion_router_weights=tuple(fusion_weights),
            fusion_router_logits=tuple(fusion_logits),
            vision_hidden_states=tuple(levels) if output_hidden_states else None,
            hidden_states=selected_hidden_states(vision_outputs.hidden_states, output_hidden_states),
        )
        return output if return_dict else output.to_tuple()


class SeraForReferringSegmentation(SeraPreTrainedModel):
    """SERA with its dynamic-kernel mask projector and training loss.

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import AutoModel, AutoProcessor

    >>> model = AutoModel.from_pretrained("org/sera-refcoco", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("org/sera-refcoco", trust_remote_code=True)
    >>> inputs = processor(images=[Image.open("dogs.jpg")], text=["the dog on the left"], return_tensors="pt")
    >>> outputs = model(**inputs)
    >>> result = processor.post_process_referring_segmentation(outputs, target_sizes=inputs["original_sizes"])[0]
    >>> result["mask"].shape  # the original image's (height, width)
    ```
    """

    def __init__(self, config: SeraConfig):
        super().__init__(config)
        # Record every Auto class we answer to: save_pretrained alone would only record the one we were saved as.
        config.auto_map = {**AUTO_MAP, **(getattr(config, "auto_map", None) or {})}
        self.model = SeraModel(config)
        sentence_dim = sentence_width(config)
        self.projector = SeraProjector(
            config.hidden_size,
            config.projector_dim,
            sentence_dim,
            config.projector_kernel_size,
            config.projector_upsample_factor,
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.FloatTensor | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SeraReferringSegmentationOutput | tuple:
        r"""
        labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth masks in [0, 1], letterboxed like `pixel_values` at its resolution (the processor's
            `labels` when given `masks=`). They are area-resized to the logits' resolution for the loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.projector(outputs.last_hidden_state, outputs.sentence_embeds)

        loss = mask_loss = z_loss = balance_loss = entropy_loss = None
        if labels is not None:
            mask_loss = self.mask_loss(logits, labels)
            z_loss, balance_loss, entropy_loss = self.router_losses(
                outputs.fusion_router_logits, outputs.fusion_router_weights
            )
            loss = mask_loss + z_loss + balance_loss + entropy_loss

        output = SeraReferringSegmentationOutput(
            loss=loss,
            logits=logits,
            mask_loss=mask_loss,
            router_z_loss=z_loss,
            router_balance_loss=balance_loss,
            router_entropy_loss=entropy_loss,
            adapter_router_weights=outputs.adapter_router_weights,
            fusion_router_weights=outputs.fusion_router_weights,
            fusion_router_logits=outputs.fusion_router_logits,
            vision_hidden_states=outputs.vision_hidden_states,
            hidden_states=outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings (see [`SeraModel.get_input_embeddings`])."""
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def freeze_encoders(self, train_norms_and_biases: bool = True) -> None:
        """The paper's regime: freeze both encoders except their LayerNorm and bias terms (and the SERA-Adapters
        that live inside the vision blocks); everything else (fusion, neck, decoder, projector) trains. The set is
        `trained_key_prefixes`, which the PEFT tuner uses too."""
        set_trainable(self, trained_key_prefixes(self, train_encoder_norms_and_biases=train_norms_and_biases))

    def mask_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE with logits on the logits' grid, plus `config.dice_loss_weight` times a soft Dice loss.

        *[ours]*: the targets are the labels area-averaged to the logits' grid (soft at object borders); DETRIS
        resizes the binary mask with nearest neighbour instead.
        """
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must have shape (batch, height, width) with batch {logits.shape[0]}, got "
                f"{tuple(labels.shape)}; build them with SeraProcessor(..., masks=...)."
            )
        targets = F.interpolate(labels[:, None].to(logits.dtype), size=logits.shape[-2:], mode="area").float()
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if self.config.dice_loss_weight > 0:
            probabilities = logits.sigmoid().flatten(1)
            targets = targets.flatten(1)
            overlap = (probabilities * targets).sum(-1)
            dice = 1 - (2 * overlap + 1) / (probabilities.sum(-1) + targets.sum(-1) + 1)
            loss = loss + self.config.dice_loss_weight * dice.mean()
        return loss

    def router_losses(self, logits, weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted MoE regularizers over the fused levels (mean or sum: `router_loss_level_reduction`), on the
        noisy or the clean routing weights (`router_regularizer_weights`); zeros in eval mode or without
        SERA-Fusion."""
        zero = self.projector.kernel_generator.weight.new_zeros((), dtype=torch.float32)
        if not logits or not self.training:
            return zero, zero, zero
        config = self.config
        if config.router_regularizer_weights == "clean":
            weights = [top_k_softmax(level.float(), config.fusion_top_k) for level in logits]
        reduce = torch.mean if config.router_loss_level_reduction == "mean" else torch.sum
        z_loss = reduce(torch.stack([router_z_loss(level) for level in logits])) * config.router_z_loss_weight
        balance = reduce(torch.stack([router_balance_loss(level) for level in weights]))
        entropy = reduce(torch.stack([router_entropy_loss(level) for level in weights]))
        return z_loss, balance * config.router_balance_loss_weight, entropy * config.router_entropy_loss_weight

    @classmethod
    def from_encoders(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        return_processor: bool = False,
        image_size: int = 448,
        max_text_length: int = 17,
        mask_threshold: float = 0.35,
        **config_kwargs,
    ):
        """Assemble SERA around pretrained encoders (Hub ids or local folders); SERA's own modules start fresh.

        `config_kwargs` set any [`SeraConfig`] field. With `return_processor=True` also returns a [`SeraProcessor`]
        made of the text model's tokenizer and the vision model's normalisation, letterboxing to `image_size`,
        tokenizing to `max_text_length` and thresholding masks at `mask_threshold` (the processor is these settings'
        one home; they are checked against the encoders here either way).
        """
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path)
        if vision_config.model_type == "clip":
            vision_config = vision_config.vision_config
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        if text_config.model_type == "clip":
            # A full CLIP checkpoint keeps the text projection's width at its top level.
            text_config.text_config.projection_dim = text_config.projection_dim
            text_config = text_config.text_config
        config = SeraConfig(vision_config=vision_config, text_config=text_config, **config_kwargs)
        from .processing_sera import SeraProcessor, check_processor_fits

        check_processor_fits(config, image_size, max_text_length)
        model = cls(config)

        vision = vision_model_class(vision_config.model_type).from_pretrained(vision_model_name_or_path)
        text = CLIPTextModelWithProjection.from_pretrained(text_model_name_or_path, config=text_config)
        load_encoder_weights(model.model.vision_model, vision)
        load_encoder_weights(model.model.text_model, text)
        logger.info(f"Loaded encoder weights from {vision_model_name_or_path} and {text_model_name_or_path}.")
        if not return_processor:
            return model
        processor = SeraProcessor.from_encoders(
            vision_model_name_or_path,
            text_model_name_or_path,
            image_size=image_size,
            max_text_length=max_text_length,
            mask_threshold=mask_threshold,
        )
        return model, processor


__all__ = [
    "MODEL_INPUT_NAMES",
    "SeraForReferringSegmentation",
    "SeraModel",
    "SeraModelOutput",
    "SeraPreTrainedModel",
    "SeraReferringSegmentationOutput",
    "load_encoder_weights",
    "trained_key_prefixes",
    "vision_model_class",
]
