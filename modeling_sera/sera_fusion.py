"""SERA-Fusion: four geometry-preserving experts behind a noisy top-K router, one per vision level (section 3).

Every expert maps a level grid X (B, C, H, W) to a refined grid of the same shape (X plus a residual); the output
is `Y = sum_k w_k * expert_k(X)` over the K experts the router kept for each sample. Only the samples that selected
an expert are run through it, so K < 4 also saves compute.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from .sera_attention import SeraAttention
from .sera_positions import normalized_coordinates
from .sera_routing import RouterDecision, SeraNoisyTopKRouter


FUSION_EXPERT_NAMES = ("spatial", "context", "boundary", "shape")

# Fixed 3x3 filters of the boundary and shape experts.
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_Y = tuple(zip(*SOBEL_X))
GAUSSIAN = tuple(tuple(tap / 16.0 for tap in row) for row in ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0)))
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
BOUNDARY_FILTERS = (SOBEL_X, SOBEL_Y)
SHAPE_FILTERS = (GAUSSIAN, LAPLACIAN)


def fixed_filter_stack(filters) -> torch.Tensor:
    """The filters as one (F, 3, 3) tensor, kept by the experts as a buffer: no host-to-device copy per call."""
    return torch.tensor(filters, dtype=torch.float32)


def apply_fixed_filters(grid: torch.Tensor, filters: torch.Tensor) -> list[torch.Tensor]:
    """Each (3, 3) filter of `filters` applied to every channel of `grid` (B, C, H, W), with replicate padding so
    that borders do not look like edges; the padding is done once for all of them."""
    channels = grid.shape[1]
    # NCHW: PyTorch's own depthwise kernel takes it on a GPU, where cuDNN's channels-last grouped convolution ran
    # these filters about 7x slower (H200). One depthwise conv per filter, with the filter broadcast over channels
    # (a stride-0 weight): on a CPU this keeps the convolution off oneDNN, whose grouped kernel gave results that
    # differed in the last bit from one process to the next.
    padded = F.pad(grid.contiguous(), (1, 1, 1, 1), mode="replicate")
    weights = filters.to(grid.dtype)
    return [F.conv2d(padded, weight.expand(channels, 1, 3, 3), groups=channels) for weight in weights]


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class SeraFusionSpatialExpert(nn.Module):
    """`X + a * Conv1x1(coords)`: injects absolute position, with a learnable scale `a`."""

    def __init__(self, channels: int, initial_scale: float):
        super().__init__()
        self.coordinate_proj = nn.Conv2d(2, channels, 1)
        self.scale = nn.Parameter(torch.tensor(float(initial_scale)))
        self.initial_scale = initial_scale

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        _, _, height, width = grid.shape
        # The coordinates are the same for every sample: project them once and broadcast over the batch.
        coords = normalized_coordinates(1, height, width, grid.device, grid.dtype)
        return grid + self.scale * self.coordinate_proj(coords)


class SeraFusionContextExpert(GradientCheckpointingLayer):
    """One pre-norm transformer encoder layer over the H*W tokens: global context, the most expensive expert."""

    def __init__(self, channels: int, num_heads: int, mlp_ratio: float, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.attention_norm = nn.LayerNorm(channels, eps=layer_norm_eps)
        self.attention = SeraAttention(channels, num_heads)
        self.mlp_norm = nn.LayerNorm(channels, eps=layer_norm_eps)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        batch_size, channels, height, width = grid.shape
        tokens = grid.flatten(2).transpose(1, 2)
        normed = self.attention_norm(tokens)
        tokens = tokens + self.attention(normed, normed)
        tokens = tokens + self.mlp(self.mlp_norm(tokens))
        return tokens.transpose(1, 2).reshape(batch_size, channels, height, width)


class SeraFusionBoundaryExpert(nn.Module):
    """`X + phi(Conv1x1([X, |G|, Gx + Gy]))` with fixed depthwise Sobel gradients Gx, Gy."""

    fixed_filters = BOUNDARY_FILTERS

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(3 * channels, channels, 1, bias=False)
        self.phi = bn_relu(channels)
        # Not saved: fixed, rebuilt at construction (and by `_init_weights` when loading from the meta device).
        self.register_buffer("filters", fixed_filter_stack(self.fixed_filters), persistent=False)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.contiguous()  # one layout for the filters and the concatenation (see apply_fixed_filters)
        grad_x, grad_y = apply_fixed_filters(grid, self.filters)
        # The epsilon keeps the gradient of sqrt finite on flat regions.
        magnitude = torch.sqrt(grad_x.pow(2) + grad_y.pow(2) + 1e-6)
        return grid + self.phi(self.proj(torch.cat((grid, magnitude, grad_x + grad_y), dim=1)))


class SeraFusionShapeExpert(nn.Module):
    """`X + phi(Conv1x1([blur(X), laplacian(X)]))` with a fixed 3x3 Gaussian and Laplacian *[ours]*."""

    fixed_filters = SHAPE_FILTERS

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.phi = bn_relu(channels)
        self.register_buffer("filters", fixed_filter_stack(self.fixed_filters), persistent=False)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        blurred, laplacian = apply_fixed_filters(grid, self.filters)
        return grid + self.phi(self.proj(torch.cat((blurred, laplacian), dim=1)))


class SeraFusion(nn.Module):
    """Routes each sample's level grid to its top-K experts and mixes their outputs with the routing weights."""

    def __init__(
        self,
        channels: int,
        router_hidden_size: int,
        top_k: int,
        router_noise_std: float,
        spatial_init: float,
        context_num_heads: int,
        context_mlp_ratio: float,
        sentence_dim: int = 0,
        router_noise_mode: str = "always",
    ):
        super().__init__()
        self.router = SeraNoisyTopKRouter(
            channels,
            router_hidden_size,
            len(FUSION_EXPERT_NAMES),
            top_k=top_k,
            noise_std=router_noise_std,
            condition_dim=sentence_dim,
            noise_mode=router_noise_mode,
        )
        self.experts = nn.ModuleDict(
            {
                "spatial": SeraFusionSpatialExpert(channels, spatial_init),
                "context": SeraFusionContextExpert(channels, context_num_heads, context_mlp_ratio),
                "boundary": SeraFusionBoundaryExpert(channels),
                "shape": SeraFusionShapeExpert(channels),
            }
        )

    @classmethod
    def from_settings(cls, channels: int, settings, sentence_dim: int) -> "SeraFusion":
        """Build from any object carrying SeraConfig's `fusion_*` fields (a SeraConfig, as the PEFT tuner passes too);
        `sentence_dim` is the width of the sentence feature, read by the router if `fusion_router_sentence`."""
        return cls(
            channels,
            router_hidden_size=settings.fusion_router_hidden_size,
            top_k=settings.fusion_top_k,
            router_noise_std=settings.fusion_router_noise_std,
            router_noise_mode=settings.fusion_router_noise,
            spatial_init=settings.fusion_spatial_init,
            context_num_heads=settings.fusion_context_num_heads,
            context_mlp_ratio=settings.fusion_context_mlp_ratio,
            sentence_dim=sentence_dim if settings.fusion_router_sentence else 0,
        )

    def forward(self, grid: torch.Tensor, sentence: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterDecision]:
        """grid: (B, C, H, W) level grid; sentence: (B, sentence_dim), read only by a sentence-aware router."""
        decision = self.router(grid, sentence)
        weights = decision.weights.to(grid.dtype)
        if self.router.top_k == len(FUSION_EXPERT_NAMES):
            # Dense: every expert on the whole batch, accumulated with one fused multiply-add per expert.
            output = None
            for index, name in enumerate(FUSION_EXPERT_NAMES):
                expert_weights = weights[:, index, None, None, None]
                expert_output = self.experts[name](grid)
                output = (
                    expert_weights * expert_output if output is None else output.addcmul(expert_weights, expert_output)
                )
            return output, decision
        output = torch.zeros_like(grid)
        for index, name in enumerate(FUSION_EXPERT_NAMES):
            expert_weights = weights[:, index]
            selected = (decision.weights[:, index] > 0).nonzero(as_tuple=True)[0]
            if selected.numel() == 0:
                continue
            expert_output = self.experts[name](grid.index_select(0, selected))
            contribution = expert_weights.index_select(0, selected)[:, None, None, None] * expert_output
            output = output.index_add(0, selected, contribution)
        return output, decision
