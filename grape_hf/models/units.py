"""The units a feedback point sits on: a weight layer with its local nonlinearity (and pooling)."""

import torch
from torch import nn
from transformers.activations import ACT2FN


class DenseUnit(nn.Module):
    """`act(linear(flatten(x)))`: (N, *in_dims) -> (N, out_features)."""

    def __init__(self, in_features: int, out_features: int, act: str):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x.flatten(1)))


class ConvUnit(nn.Module):
    """`pool(act(norm(conv(x))))`: (N, C_in, H, W) -> (N, C_out, H', W').

    Args:
        kernel_size, stride, padding: of the convolution.
        batch_norm: a BatchNorm2d after the convolution (the convolution then has no bias).
        pool: kernel (= stride) of a max pooling after the nonlinearity; 0 for none.
    """

    def __init__(self, in_channels: int, out_channels: int, act: str, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, batch_norm: bool = False, pool: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = ACT2FN[act]
        self.pool = nn.MaxPool2d(pool) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))
