"""Position signals shared by SERA-Fusion, the neck and the decoder: normalised coordinates and sine encodings."""

import math

import torch


def normalized_coordinates(batch_size: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """(B, 2, H, W) maps of x and y in [-1, 1] at pixel centres, the "coords" of the spatial expert and coord-conv."""
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y)).unsqueeze(0).expand(batch_size, -1, -1, -1)


def sine_position_encoding_2d(height: int, width: int, channels: int, device, dtype) -> torch.Tensor:
    """(H*W, C) fixed 2-D sine/cosine encoding: half of the channels encode y, half encode x (as in DETR)."""
    if channels % 4:
        raise ValueError(f"2-D sine position encoding needs a channel count divisible by 4, got {channels}.")
    quarter = channels // 4
    frequencies = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(10000.0) / quarter))
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    xs = torch.arange(width, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    y_code = torch.cat((ys.sin(), ys.cos()), dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    x_code = torch.cat((xs.sin(), xs.cos()), dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat((y_code, x_code), dim=-1).reshape(height * width, channels).to(dtype)


def sine_position_encoding_1d(length: int, channels: int, device, dtype) -> torch.Tensor:
    """(L, C) fixed 1-D sine/cosine encoding for word positions."""
    if channels % 2:
        raise ValueError(f"1-D sine position encoding needs an even channel count, got {channels}.")
    half = channels // 2
    frequencies = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-math.log(10000.0) / half))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * frequencies[None]
    return torch.cat((angles.sin(), angles.cos()), dim=-1).to(dtype)
