"""Convolution blocks shared by the SERA-Adapter and the segmentation head."""

from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, groups: int = 1) -> nn.Sequential:
    """`ReLU(BN(Conv(x)))` with "same" padding and no conv bias (the BatchNorm has one)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
