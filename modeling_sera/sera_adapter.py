"""SERA-Adapter: a text-conditioned dense adapter on the FFN path of selected vision blocks (design section 2).

In an adapted block the FFN becomes `mlp(norm2(x)) + s * adapter(norm2(x), words)`, the block's LayerScale and
residual being applied afterwards as usual. `SeraAdaptedMLP` is the module that takes the place of the block's `mlp`
so that the backbone's own forward is left untouched.

The words reach it through a scope (`sera_vision_scope`) that `SeraModel` opens around each vision forward, private to
the calling thread, so that one model can serve several threads at once; the adapter records its router weights in
the same scope, and the model returns them as values. Under gradient checkpointing the words must be inputs of each
checkpoint, or a reentrant checkpoint would backpropagate into the text tower a second time when it replays a block:
`checkpoint_with_words` wraps an adapted block's checkpoint function so that the words are passed to it as arguments
and the router weights come back from it as outputs.

Why a scope rather than keyword arguments through the backbone's forward (as CLIPSeg conditions its decoder):
transformers' vision blocks (DINOv2, DINOv2 with registers, CLIP) forward their `**kwargs` to the attention only and
call `self.mlp(hidden_states)` bare, and their encoders expect a block to return one tensor; words as arguments would
mean re-implementing each backbone's block and encoder forward here, which ties SERA to transformers' internals
release by release. Kwargs would not even make checkpointing simpler: `GradientCheckpointingLayer` binds them with
`functools.partial`, so a reentrant checkpoint would still not see the words as inputs.
"""

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .sera_attention import SeraAttention
from .sera_conv import conv_bn_relu
from .sera_routing import SeraSoftRouter


# The order of the adapter's routed experts in its router weights (SeraModelOutput.adapter_router_weights).
ADAPTER_EXPERT_NAMES = ("spatial", "boundary")


@dataclass
class SeraVisionContext:
    """What an adapter needs besides the visual tokens: the words, their padding mask and the patch grid shape."""

    word_states: torch.Tensor  # (B, L, text width)
    word_mask: torch.Tensor | None  # (B, L), 1 for real tokens
    grid_height: int
    grid_width: int
    num_special_tokens: int  # CLS + registers in front of the patch tokens


@dataclass
class SeraVisionScope:
    """One vision forward: the context its adapters read, and the router weights they record (by module id)."""

    context: SeraVisionContext
    router_weights: dict[int, torch.Tensor] = field(default_factory=dict)


_SCOPES = threading.local()


@contextmanager
def sera_vision_scope(context: SeraVisionContext):
    """Make `context` what the SERA-Adapters of this thread read until the block ends (scopes nest)."""
    previous = getattr(_SCOPES, "scope", None)
    scope = SeraVisionScope(context)
    _SCOPES.scope = scope
    try:
        yield scope
    finally:
        _SCOPES.scope = previous


def current_vision_scope() -> SeraVisionScope:
    scope = getattr(_SCOPES, "scope", None)
    if scope is None:
        raise RuntimeError(
            "SERA-Adapter called without word features: run the vision tower through SeraModel, which hands them "
            "over for each forward."
        )
    return scope


def checkpoint_with_words(checkpoint_function):
    """Wrap a vision block's gradient-checkpointing function (`checkpoint(function, *args)`) so that the words and
    their mask are inputs of the checkpoint, and the router weights recorded inside come back as its outputs."""
    if getattr(checkpoint_function, "passes_sera_words", None) is True:  # `is`: a Mock would answer anything
        return checkpoint_function

    def checkpoint_block(function, *args):
        scope = current_vision_scope()
        context = scope.context
        recorded: list[int] = []

        def block_with_words(*inputs):
            *block_inputs, word_states, word_mask = inputs
            with sera_vision_scope(replace(context, word_states=word_states, word_mask=word_mask)) as inner:
                output = function(*block_inputs)
            recorded[:] = inner.router_weights.keys()
            return (output, *inner.router_weights.values())

        output, *router_weights = checkpoint_function(block_with_words, *args, context.word_states, context.word_mask)
        scope.router_weights.update(zip(recorded, router_weights))
        return output

    checkpoint_block.passes_sera_words = True
    return checkpoint_block


class SeraMultiScaleEnrichment(nn.Module):
    """Densely connected 1x1, 3x3 and 5x5 branches whose concatenated outputs (d channels) are added to the grid.

    Branch widths d/2, d/4, d/4 *[ours]*; each later branch sees the input concatenated with the earlier outputs and
    starts with a 1x1 reduction.
    """

    def __init__(self, dim: int):
        super().__init__()
        widths = (dim // 2, dim // 4, dim - dim // 2 - dim // 4)
        self.branch_1x1 = conv_bn_relu(dim, widths[0], 1)
        self.branch_3x3 = nn.Sequential(
            conv_bn_relu(dim + widths[0], widths[1], 1), conv_bn_relu(widths[1], widths[1], 3)
        )
        self.branch_5x5 = nn.Sequential(
            conv_bn_relu(dim + widths[0] + widths[1], widths[2], 1), conv_bn_relu(widths[2], widths[2], 5)
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        out_1 = self.branch_1x1(grid)
        out_3 = self.branch_3x3(torch.cat((grid, out_1), dim=1))
        out_5 = self.branch_5x5(torch.cat((grid, out_1, out_3), dim=1))
        return grid + torch.cat((out_1, out_3, out_5), dim=1)


class SeraAdapterDepthwiseExpert(nn.Module):
    """What both routed experts of the adapter are made of: a depthwise 3x3 conv, a BatchNorm and a residual scale."""

    def __init__(self, dim: int, residual_scale: float):
        super().__init__()
        self.residual_scale = residual_scale
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)


class SeraAdapterBoundaryExpert(SeraAdapterDepthwiseExpert):
    """`E_b = ReLU(BN(G + c * DWConv3x3(G)))`: sharpens local transitions."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(grid + self.residual_scale * self.depthwise(grid)))


class SeraAdapterSpatialExpert(SeraAdapterDepthwiseExpert):
    """`E_s = ReLU(BN(DWConv3x3(G))) + c * G`: local spatial context with a skip."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.depthwise(grid))) + self.residual_scale * grid


class SeraAdapter(nn.Module):
    """adapter(x, words) of design section 2: down-projection, multi-scale enrichment, two routed experts,
    cross-attention to the words, up-projection."""

    def __init__(
        self,
        hidden_size: int,
        text_hidden_size: int,
        dim: int = 128,
        num_heads: int = 8,
        boundary_residual_scale: float = 0.1,
        spatial_residual_scale: float = 0.3,
        spatial_expert_weight: float = 0.25,
        boundary_expert_weight: float = 0.15,
        mask_padding: bool = True,
    ):
        super().__init__()
        self.spatial_expert_weight = spatial_expert_weight
        self.boundary_expert_weight = boundary_expert_weight
        self.mask_padding = mask_padding
        self.down_proj = nn.Linear(hidden_size, dim)
        self.enrichment = SeraMultiScaleEnrichment(dim)
        self.spatial_expert = SeraAdapterSpatialExpert(dim, spatial_residual_scale)
        self.boundary_expert = SeraAdapterBoundaryExpert(dim, boundary_residual_scale)
        self.router = SeraSoftRouter(dim, num_experts=len(ADAPTER_EXPERT_NAMES))  # ADAPTER_EXPERT_NAMES order
        self.word_attention = SeraAttention(dim, num_heads, key_value_dim=text_hidden_size)
        self.up_proj = nn.Linear(dim, hidden_size)

    @classmethod
    def from_settings(cls, hidden_size: int, text_hidden_size: int, settings) -> "SeraAdapter":
        """Build from a SeraConfig (its `adapter_*` fields); the PEFT tuner passes one too."""
        return cls(
            hidden_size,
            text_hidden_size,
            dim=settings.adapter_dim,
            num_heads=settings.adapter_num_heads,
            boundary_residual_scale=settings.adapter_boundary_residual_scale,
            spatial_residual_scale=settings.adapter_spatial_residual_scale,
            spatial_expert_weight=settings.adapter_spatial_expert_weight,
            boundary_expert_weight=settings.adapter_boundary_expert_weight,
            mask_padding=settings.adapter_mask_padding,
        )

    def forward(self, hidden_states: torch.Tensor, context: SeraVisionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the adapter output (B, N, hidden) and the router weights (B, 2) = [w_spatial, w_boundary]."""
        x0 = torch.relu(self.down_proj(hidden_states))
        batch_size, _, dim = x0.shape
        special, patches = x0[:, : context.num_special_tokens], x0[:, context.num_special_tokens :]
        grid = patches.transpose(1, 2).reshape(batch_size, dim, context.grid_height, context.grid_width)

        rich = self.enrichment(grid)
        decision = self.router(rich)
        # Per-sample scales (B, 1, 1, 1) of each expert: its fixed weight times its routing weight.
        spatial_scale = self.spatial_expert_weight * decision.weights[:, 0, None, None, None]
        boundary_scale = self.boundary_expert_weight * decision.weights[:, 1, None, None, None]
        corrected = rich.addcmul(spatial_scale, self.spatial_expert(rich)).addcmul(
            boundary_scale, self.boundary_expert(rich)
        )

        tokens = corrected.flatten(2).transpose(1, 2)
        word_mask = context.word_mask if self.mask_padding else None
        # [ours]: a residual around the word attention (the design's step 5 gives none; DETRIS's adapter has none).
        tokens = tokens + self.word_attention(tokens, context.word_states.to(tokens.dtype), key_padding_mask=word_mask)
        # Re-attach the special tokens (they skip the grid path) and add the x0 skip over the whole sequence.
        adapted = torch.cat((special, tokens), dim=1) + x0
        return self.up_proj(adapted), decision.weights


class SeraAdaptedMLP(nn.Module):
    """Takes the place of a vision block's `mlp`: `base_layer(x) + scale * adapter(x, words)`.

    The block calls `mlp(norm2(x))`, so `x` here is already the normalised input the design asks for. The words come
    from the current `sera_vision_scope`, where the router weights go too. This forward is the one implementation of
    an adapted MLP: the PEFT tuner's `SeraAdapterLayer` is a subclass that only says which adapters are active.
    """

    reads_sera_words = True

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, scale):
        super().__init__()
        self.base_layer = base_layer
        self.sera_adapter = adapter
        self.scale = scale

    def active_sera_adapters(self) -> list[tuple[SeraAdapter, float]]:
        """The (adapter, scale) pairs that take part in the forward pass: here the one adapter."""
        return [(self.sera_adapter, self.scale)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(hidden_states)
        active = self.active_sera_adapters()
        if not active:
            return output
        scope = current_vision_scope()
        for adapter, scale in active:
            adapter_output, router_weights = adapter(hidden_states, scope.context)
            scope.router_weights[id(self)] = router_weights
            output = output + scale * adapter_output
        return output
