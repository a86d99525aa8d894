"""Multi-head attention used by SERA's own modules (adapter cross-attention, context expert, decoder).

It runs on `torch.nn.functional.scaled_dot_product_attention`, so PyTorch picks the flash, memory-efficient or
math kernel for the device and dtype at hand.
"""

import torch
from torch import nn
from torch.nn import functional as F


class SeraAttention(nn.Module):
    """Multi-head attention with separate query and key/value inputs and an optional key padding mask."""

    def __init__(self, query_dim: int, num_heads: int, key_value_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the attention width {query_dim}.")
        key_value_dim = key_value_dim or query_dim
        self.num_heads = num_heads
        self.head_dim = query_dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(query_dim, query_dim)
        self.k_proj = nn.Linear(key_value_dim, query_dim)
        self.v_proj = nn.Linear(key_value_dim, query_dim)
        self.o_proj = nn.Linear(query_dim, query_dim)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        queries: (B, Lq, Dq); keys/values: (B, Lk, Dkv); key_padding_mask: (B, Lk), 1/True for real tokens.
        """
        values = keys if values is None else values
        query = self._split_heads(self.q_proj(queries))
        key = self._split_heads(self.k_proj(keys))
        value = self._split_heads(self.v_proj(values))
        attn_mask = None
        if key_padding_mask is not None:
            # Boolean mask broadcast over heads and queries: True means "may attend".
            attn_mask = key_padding_mask.bool()[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        batch_size, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch_size, length, -1))
