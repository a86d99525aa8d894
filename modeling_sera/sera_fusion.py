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

# Fixed 3x3 filters; built per call in the input's dtype and device rather than stored, so that no untrained
# buffer needs initialising when a checkpoint is loaded.
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_GAUSSIAN = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def depthwise_filter(grid: torch.Tensor, taps, normalize: bool = False) -> torch.Tensor:
    """Apply one fixed 3x3 filter to every channel (replicate padding so borders do not look like edges)."""
    # Made on the host, then sent without blocking: `torch.tensor(taps, device="cuda")` would wait for every queued
    # kernel to finish (a host-device synchronisation per filter, twelve per forward).
    kernel = torch.tensor(taps, dtype=grid.dtype).to(grid.device, non_blocking=True)
    if normalize:
        kernel = kernel / kernel.sum()
    channels = grid.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(grid, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


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
        batch_size, _, height, width = grid.shape
        coords = normalized_coordinates(batch_size, height, width, grid.device, grid.dtype)
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

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(3 * channels, channels, 1, bias=False)
        self.phi = bn_relu(channels)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        grad_x = depthwise_filter(grid, _SOBEL_X)
        grad_y = depthwise_filter(grid, tuple(zip(*_SOBEL_X)))
        # The epsilon keeps the gradient of sqrt finite on flat regions.
        magnitude = torch.sqrt(grad_x.pow(2) + grad_y.pow(2) + 1e-6)
        return grid + self.phi(self.proj(torch.cat((grid, magnitude, grad_x + grad_y), dim=1)))


class SeraFusionShapeExpert(nn.Module):
    """`X + phi(Conv1x1([blur(X), laplacian(X)]))` with a fixed 3x3 Gaussian and Laplacian *[ours]*."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(2 * channels, channels, 1, bias=False)
        self.phi = bn_relu(channels)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        blurred = depthwise_filter(grid, _GAUSSIAN, normalize=True)
        laplacian = depthwise_filter(grid, _LAPLACIAN)
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
    ):
        super().__init__()
        self.router = SeraNoisyTopKRouter(
            channels, router_hidden_size, len(FUSION_EXPERT_NAMES), top_k=top_k, noise_std=router_noise_std
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
    def from_settings(cls, channels: int, settings) -> "SeraFusion":
        """Build from any object carrying SeraConfig's `fusion_*` fields (SeraConfig, or the PEFT tuner config)."""
        return cls(
            channels,
            router_hidden_size=settings.fusion_router_hidden_size,
            top_k=settings.fusion_top_k,
            router_noise_std=settings.fusion_router_noise_std,
            spatial_init=settings.fusion_spatial_init,
            context_num_heads=settings.fusion_context_num_heads,
            context_mlp_ratio=settings.fusion_context_mlp_ratio,
        )

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, RouterDecision]:
        decision = self.router(grid)
        weights = decision.weights.to(grid.dtype)
        output = torch.zeros_like(grid)
        for index, name in enumerate(FUSION_EXPERT_NAMES):
            expert_weights = weights[:, index]
            if self.router.top_k == len(FUSION_EXPERT_NAMES):
                output = output + expert_weights[:, None, None, None] * self.experts[name](grid)
                continue
            selected = (decision.weights[:, index] > 0).nonzero(as_tuple=True)[0]
            if selected.numel() == 0:
                continue
            expert_output = self.experts[name](grid.index_select(0, selected))
            contribution = expert_weights.index_select(0, selected)[:, None, None, None] * expert_output
            output = output.index_add(0, selected, contribution)
        return output, decision
