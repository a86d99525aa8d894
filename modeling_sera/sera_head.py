"""Segmentation head inherited from DETRIS: multimodal neck, vision-language decoder and dynamic-kernel projector."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from .sera_attention import SeraAttention
from .sera_conv import conv_bn_relu
from .sera_positions import normalized_coordinates, sine_position_encoding_1d, sine_position_encoding_2d


class SeraNeck(nn.Module):
    """Merges the vision levels into one sentence-aware grid.

    Per level: a 1x1 projection to the multimodal width, multiplied channel-wise by a gate computed from the sentence
    feature *[ours: the paper's "gating by cross-attention to the sentence" has a single key, which reduces to such a
    gate]*, then BN + ReLU *[ours: the gate comes before BN + ReLU; DETRIS normalises first]*. The levels are
    concatenated, aggregated by a 1x1 conv, and a coordinate-conv residual (3x3 conv over the grid and its x/y maps)
    adds explicit geometry *[ours: one CoordConv; DETRIS stacks two]*.
    """

    def __init__(self, level_channels: list[int], sentence_dim: int, hidden_size: int):
        super().__init__()
        self.level_projs = nn.ModuleList([nn.Conv2d(channels, hidden_size, 1) for channels in level_channels])
        self.sentence_gates = nn.ModuleList([nn.Linear(sentence_dim, hidden_size) for _ in level_channels])
        self.level_norms = nn.ModuleList(
            [nn.Sequential(nn.BatchNorm2d(hidden_size), nn.ReLU(inplace=True)) for _ in level_channels]
        )
        self.aggregate = conv_bn_relu(len(level_channels) * hidden_size, hidden_size, 1)
        self.coordinate_conv = conv_bn_relu(hidden_size + 2, hidden_size, 3)

    def forward(self, levels: list[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        gated = []
        for level, proj, gate, norm in zip(levels, self.level_projs, self.sentence_gates, self.level_norms):
            gated.append(norm(proj(level) * gate(sentence)[:, :, None, None]))
        merged = self.aggregate(torch.cat(gated, dim=1))
        batch_size, _, height, width = merged.shape
        coords = normalized_coordinates(batch_size, height, width, merged.device, merged.dtype)
        return merged + self.coordinate_conv(torch.cat((merged, coords), dim=1))


class SeraDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm layer: self-attention over the grid, cross-attention to the words, FFN.

    *[ours]*: pre-norm residual blocks (a LayerNorm before each sub-layer, one after the stack); DETRIS's decoder
    also normalises after each attention, which this layer does not.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.self_attention_norm = nn.LayerNorm(hidden_size)
        self.self_attention = SeraAttention(hidden_size, num_heads, dropout=dropout)
        self.cross_attention_norm = nn.LayerNorm(hidden_size)
        self.cross_attention = SeraAttention(hidden_size, num_heads, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(intermediate_size, hidden_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        visual: torch.Tensor,
        visual_pos: torch.Tensor,
        words: torch.Tensor,
        word_pos: torch.Tensor,
        word_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        normed = self.self_attention_norm(visual)
        visual = visual + self.dropout(self.self_attention(normed + visual_pos, normed + visual_pos, normed))
        normed = self.cross_attention_norm(visual)
        visual = visual + self.dropout(
            self.cross_attention(normed + visual_pos, words + word_pos, words, key_padding_mask=word_mask)
        )
        return visual + self.dropout(self.mlp(self.mlp_norm(visual)))


class SeraDecoder(nn.Module):
    """Stack of decoder layers with fixed sine position encodings for the grid and the words."""

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(
            [SeraDecoderLayer(hidden_size, num_heads, intermediate_size, dropout) for _ in range(num_layers)]
        )
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, grid: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None) -> torch.Tensor:
        batch_size, channels, height, width = grid.shape
        visual = grid.flatten(2).transpose(1, 2)
        visual_pos = sine_position_encoding_2d(height, width, channels, grid.device, grid.dtype)[None]
        word_pos = sine_position_encoding_1d(words.shape[1], channels, words.device, words.dtype)[None]
        for layer in self.layers:
            visual = layer(visual, visual_pos, words, word_pos, word_mask)
        return self.norm(visual).transpose(1, 2).reshape(batch_size, channels, height, width)


class SeraProjector(nn.Module):
    """Upsamples the grid (x4 in DETRIS) and convolves it with a kernel generated from the sentence: mask logits.

    Each factor of 2 is a bilinear x2 followed by a 3x3 conv-BN-ReLU; the last of them narrows to `projector_dim`, and
    a 1x1 conv follows. With `upsample_factor=1` a single 3x3 conv-BN-ReLU narrows the grid in place.
    """

    def __init__(
        self, hidden_size: int, projector_dim: int, sentence_dim: int, kernel_size: int, upsample_factor: int = 4
    ):
        super().__init__()
        self.kernel_size = kernel_size
        self.projector_dim = projector_dim
        num_stages = {1: 0, 2: 1, 4: 2}[upsample_factor]
        layers: list[nn.Module] = []
        for stage in range(num_stages):
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            out_channels = projector_dim if stage == num_stages - 1 else hidden_size
            layers.append(conv_bn_relu(hidden_size, out_channels, 3))
        if num_stages == 0:
            layers.append(conv_bn_relu(hidden_size, projector_dim, 3))
        layers.append(nn.Conv2d(projector_dim, projector_dim, 1))
        self.upsample = nn.Sequential(*layers)
        self.kernel_generator = nn.Linear(sentence_dim, projector_dim * kernel_size * kernel_size + 1)

    def forward(self, grid: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        features = self.upsample(grid)
        batch_size, channels, height, width = features.shape
        params = self.kernel_generator(sentence).to(features.dtype)
        weight = params[:, :-1].reshape(batch_size, channels, self.kernel_size, self.kernel_size)
        bias = params[:, -1]
        # One group per sample applies each sample's own kernel in a single conv call.
        logits = F.conv2d(
            features.reshape(1, batch_size * channels, height, width),
            weight,
            bias=bias,
            padding=self.kernel_size // 2,
            groups=batch_size,
        )
        return logits.reshape(batch_size, 1, height, width)
