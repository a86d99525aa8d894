"""Routers of both SERA stages and the mixture-of-experts regularizers they share.

- SERA-Adapter uses a dense soft router: every expert always contributes, which keeps the frozen encoder stable.
- SERA-Fusion uses a sparse router: noisy logits during training, top-K kept, softmax over the kept ones.
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class RouterDecision:
    """What one router decided for a batch: clean logits (B, E) and routing weights (B, E), zero where unused."""

    logits: torch.Tensor
    weights: torch.Tensor


class SeraSoftRouter(nn.Module):
    """`softmax(Linear(mean over the grid))`: per-sample weights over the adapter's experts."""

    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts)

    def forward(self, grid: torch.Tensor) -> RouterDecision:
        logits = self.gate(grid.mean(dim=(2, 3)))
        return RouterDecision(logits=logits, weights=logits.softmax(dim=-1))


def top_k_softmax(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over the `top_k` largest logits of each row, zero elsewhere."""
    if top_k == logits.shape[-1]:
        return logits.softmax(dim=-1)
    kept_logits, kept_index = logits.topk(top_k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, kept_index, kept_logits.softmax(dim=-1))


ROUTER_NOISE_MODES = ("always", "sparse_only")


class SeraNoisyTopKRouter(nn.Module):
    """`r = W2 GELU(W1 mean_hw(X))`; Gaussian noise on `r` while training; top-K kept; softmax over those K.

    With `condition_dim > 0` the router also reads a per-sample condition vector c: `r = W2 GELU(W1 [mean_hw(X); c])`.
    `noise_mode="sparse_only"` adds the noise only when K is smaller than the number of experts: with all experts
    kept there is nothing to explore, and the noise only jitters the weights.
    """

    def __init__(
        self,
        dim: int,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        noise_std: float,
        condition_dim: int = 0,
        noise_mode: str = "always",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts {num_experts}.")
        if noise_mode not in ROUTER_NOISE_MODES:
            raise ValueError(f"noise_mode={noise_mode!r} must be one of {ROUTER_NOISE_MODES}.")
        self.top_k = top_k
        self.noise_std = noise_std
        self.noise_mode = noise_mode
        self.condition_dim = condition_dim
        self.fc1 = nn.Linear(dim + condition_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, num_experts)

    def forward(self, grid: torch.Tensor, condition: torch.Tensor | None = None) -> RouterDecision:
        features = grid.mean(dim=(2, 3))
        if self.condition_dim:
            if condition is None:
                raise ValueError(
                    "This router reads a condition vector (the sentence feature, fusion_router_sentence=True); "
                    "pass it with the grid."
                )
            features = torch.cat((features, condition.to(features.dtype)), dim=-1)
        logits = self.fc2(F.gelu(self.fc1(features)))
        selection_logits = logits
        sparse = self.top_k < logits.shape[-1]
        if self.training and self.noise_std > 0 and (sparse or self.noise_mode == "always"):
            # Noise lets under-used experts be tried, so the router does not lock in early.
            selection_logits = logits + torch.randn_like(logits) * self.noise_std
        return RouterDecision(logits=logits, weights=top_k_softmax(selection_logits, self.top_k))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared router logit over batch and experts; keeps logits small so the softmax stays well conditioned."""
    return logits.float().pow(2).mean()


def router_balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation of the per-expert routing mass over the batch; 0 when usage is uniform."""
    usage = weights.float().sum(dim=0)
    return usage.var(unbiased=False) / usage.mean().pow(2).clamp_min(1e-12)


def router_entropy_loss(weights: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the per-sample routing weights; penalising it discourages dithering assignments."""
    weights = weights.float()
    return -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1).mean()
