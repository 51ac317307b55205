"""ResNet for CIFAR (He et al. 2016, section 4.2): a 3x3 conv stem of 16 channels, three stages of
(depth - 2) / 6 basic blocks (16, 32, 64 channels; the second and third stages halve the resolution),
global average pooling and the classifier. Shortcuts are option A (identity, subsampled and
zero-padded where the shape changes), so every weight sits in a conv unit or the classifier.
ResNet-20: depth=20; ResNet-56: depth=56.
"""

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .base import ImageClassifierModel
from .units import ConvUnit


@strict
class CifarResNetConfig(PretrainedConfig):
    """Configuration of `CifarResNetForImageClassification` (num_labels as in every `PretrainedConfig`).

    Attributes:
        depth: number of weight layers, 6n + 2 (20, 32, 44, 56, 110).
        widths: channels of the three stages (the stem has widths[0]).
    """

    model_type = "grape_resnet"
    num_channels: int = 3
    image_size: int = 32
    depth: int = 20
    widths: list[int] | tuple = (16, 32, 64)
    hidden_act: str = "relu"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth={self.depth} is not a CIFAR ResNet depth: use 6n + 2 (20, 32, 44, 56, 110).")
        if len(self.widths) != 3:
            raise ValueError(f"widths={self.widths!r} needs one width per stage (three), e.g. [16, 32, 64].")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is unknown; use a transformers activation such as "
                             "'relu'.")
        if self.image_size < 4:
            raise ValueError(f"image_size={self.image_size} is too small: the stages halve it twice. Use 32x32.")


class CifarResNetBlock(nn.Module):
    """`act(norm2(conv2(unit1(x))) + shortcut(x))`: (N, C_in, H, W) -> (N, C_out, H/stride, W/stride)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, act: str):
        super().__init__()
        self.unit1 = ConvUnit(in_channels, out_channels, act, 3, stride, 1, batch_norm=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.act = ACT2FN[act]
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: identity; subsampled by the stride and zero-padded to the new channels."""
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = nn.functional.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x):
        return self.act(self.norm2(self.conv2(self.unit1(x))) + self.shortcut(x))


class CifarResNetForImageClassification(ImageClassifierModel):
    """Images (N, C, H, W) -> `stem` -> `blocks` -> mean over H, W -> `classifier` -> logits (N, num_labels).

    Feedback points: micro = every weight layer: the stem, each block's first conv unit, and each
    block's output (its second conv through norm, shortcut sum and nonlinearity); macro = the stem and
    every block. Every block input is a cut, so the shortcuts carry no gradient between blocks.
    """

    config_class = CifarResNetConfig
    base_model_prefix = "resnet"
    _no_split_modules = ["CifarResNetBlock"]
    _feedback_points = {"micro": ("stem", "blocks.*.unit1", "blocks.*"), "macro": ("stem", "blocks.*")}

    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        per_stage = (config.depth - 2) // 6
        self.stem = ConvUnit(config.num_channels, config.widths[0], config.hidden_act, 3, 1, 1, batch_norm=True)
        blocks, in_channels = [], config.widths[0]
        for stage, width in enumerate(config.widths):
            for i in range(per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(CifarResNetBlock(in_channels, width, stride, config.hidden_act))
                in_channels = width
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(config.widths[-1], config.num_labels)
        self.post_init()

    def features(self, pixel_values):
        hidden = self.stem(pixel_values)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden.mean(dim=(2, 3))
