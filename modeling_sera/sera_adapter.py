"""SERA-Adapter: a text-conditioned dense adapter on the FFN path of selected vision blocks (design section 2).

In an adapted block the FFN becomes `mlp(norm2(x)) + s * adapter(norm2(x), words)`, the block's LayerScale and
residual being applied afterwards as usual. `SeraAdaptedMLP` is the module that takes the place of the block's `mlp`
so that the backbone's own forward is left untouched; the words reach it through `set_vision_context`, which the
model calls before each vision forward.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .sera_attention import SeraAttention
from .sera_routing import SeraSoftRouter


@dataclass
class SeraVisionContext:
    """What an adapter needs besides the visual tokens: the words, their padding mask and the patch grid shape."""

    word_states: torch.Tensor  # (B, L, text width)
    word_mask: torch.Tensor | None  # (B, L), 1 for real tokens
    grid_height: int
    grid_width: int
    num_special_tokens: int  # CLS + registers in front of the patch tokens


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SeraMultiScaleEnrichment(nn.Module):
    """Densely connected 1x1, 3x3 and 5x5 branches whose concatenated outputs (d channels) are added to the grid.

    Branch widths d/2, d/4, d/4 *[ours]*; each later branch sees the input concatenated with the earlier outputs and
    starts with a 1x1 reduction.
    """

    def __init__(self, dim: int):
        super().__init__()
        widths = (dim // 2, dim // 4, dim - dim // 2 - dim // 4)
        self.branch_1x1 = conv_bn_relu(dim, widths[0], 1)
        self.branch_3x3 = nn.Sequential(conv_bn_relu(dim + widths[0], widths[1], 1), conv_bn_relu(widths[1], widths[1], 3))
        self.branch_5x5 = nn.Sequential(
            conv_bn_relu(dim + widths[0] + widths[1], widths[2], 1), conv_bn_relu(widths[2], widths[2], 5)
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        out_1 = self.branch_1x1(grid)
        out_3 = self.branch_3x3(torch.cat((grid, out_1), dim=1))
        out_5 = self.branch_5x5(torch.cat((grid, out_1, out_3), dim=1))
        return grid + torch.cat((out_1, out_3, out_5), dim=1)


class SeraAdapterBoundaryExpert(nn.Module):
    """`E_b = ReLU(BN(G + c * DWConv3x3(G)))`: sharpens local transitions."""

    def __init__(self, dim: int, residual_scale: float):
        super().__init__()
        self.residual_scale = residual_scale
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(grid + self.residual_scale * self.depthwise(grid)))


class SeraAdapterSpatialExpert(nn.Module):
    """`E_s = ReLU(BN(DWConv3x3(G))) + c * G`: local spatial context with a skip."""

    def __init__(self, dim: int, residual_scale: float):
        super().__init__()
        self.residual_scale = residual_scale
        self.depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.BatchNorm2d(dim)

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
        self.router = SeraSoftRouter(dim, num_experts=2)  # weights ordered [spatial, boundary]
        self.word_attention = SeraAttention(dim, num_heads, key_value_dim=text_hidden_size)
        self.up_proj = nn.Linear(dim, hidden_size)

    @classmethod
    def from_settings(cls, hidden_size: int, text_hidden_size: int, settings) -> "SeraAdapter":
        """Build from any object carrying SeraConfig's `adapter_*` fields (SeraConfig, or the PEFT tuner config)."""
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
        tokens = tokens + self.word_attention(tokens, context.word_states.to(tokens.dtype), key_padding_mask=word_mask)
        # Re-attach the special tokens (they skip the grid path) and add the x0 skip over the whole sequence.
        adapted = torch.cat((special, tokens), dim=1) + x0
        return self.up_proj(adapted), decision.weights


class SeraAdaptedMLP(nn.Module):
    """Takes the place of a vision block's `mlp`: `base_layer(x) + scale * adapter(x, words)`.

    The block calls `mlp(norm2(x))`, so `x` here is already the normalised input the design asks for.
    """

    def __init__(self, base_layer: nn.Module, adapter: SeraAdapter, scale: float):
        super().__init__()
        self.base_layer = base_layer
        self.sera_adapter = adapter
        self.scale = scale
        self.context: SeraVisionContext | None = None
        self.router_weights: torch.Tensor | None = None

    def set_vision_context(self, context: SeraVisionContext | None) -> None:
        # Kept until the next forward: gradient checkpointing replays this module during the backward pass.
        self.context = context

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            raise RuntimeError(
                "SERA-Adapter called without word features: run the vision tower through SeraModel, which sets "
                "them with set_vision_context() before each forward."
            )
        adapter_output, router_weights = self.sera_adapter(hidden_states, self.context)
        # Detached: kept for inspection only. A live tensor here would keep the autograd graph of the replayed
        # forward (and every activation it saved) alive until the next step under activation checkpointing.
        self.router_weights = router_weights.detach()
        return self.base_layer(hidden_states) + self.scale * adapter_output
