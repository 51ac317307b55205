"""A plain convolutional classifier: stages of conv units (each stage ends in a 2x2 max pool), then
dense units, then the classifier. The CNN (LeNet-4), AlexNet and VGG-16 are its presets (cnn.py,
alexnet.py, vgg.py).

Feedback points: micro = every weight layer (each conv unit: conv -> [batch norm] -> nonlinearity
[-> pool]; each dense unit), the paper's DFA. Macro = every stage (the conv units between two
poolings, VGG's blocks) and every dense unit (the dense head has no blocks).
"""

from itertools import pairwise

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .base import ImageClassifierModel
from .units import ConvUnit, DenseUnit


@strict
class ConvNetConfig(PretrainedConfig):
    """Configuration of `ConvNetForImageClassification` (num_labels as in every `PretrainedConfig`).

    Attributes:
        conv_channels: output channels of each conv unit, grouped in stages; a stage ends in a 2x2 max pool.
        kernel_size, padding: of every convolution (stride 1).
        batch_norm: a BatchNorm2d after every convolution.
        hidden_sizes: widths of the dense units between the last stage and the classifier.
        hidden_act: the nonlinearity of every unit.
    """

    model_type = "grape_convnet"
    num_channels: int = 3
    image_size: int = 32
    conv_channels: list[list[int]] | tuple = ((4,), (16,))
    kernel_size: int = 5
    padding: int = 0
    batch_norm: bool = False
    hidden_sizes: list[int] | tuple = (120,)
    hidden_act: str = "relu"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is unknown; use a transformers activation such as "
                             "'relu', 'tanh' or 'gelu'.")
        if not self.conv_channels or not all(self.conv_channels):
            raise ValueError(f"conv_channels={self.conv_channels!r} needs at least one stage and one conv unit per "
                             "stage, e.g. [[64, 64], [128, 128]].")
        if self.output_size() < 1:
            raise ValueError(
                f"image_size={self.image_size} is too small for {type(self).__name__}: its {len(self.conv_channels)} "
                f"stages (kernel {self.kernel_size}, padding {self.padding}, 2x2 pooling each) shrink it below 1 "
                "pixel. Use larger images (resize to 32x32) or fewer stages."
            )

    def output_size(self) -> int:
        """Height (= width) of the last stage's output."""
        size = self.image_size
        for stage in self.conv_channels:
            for _ in stage:
                size = size + 2 * self.padding - self.kernel_size + 1
            size //= 2
        return size


class ConvStage(nn.Module):
    """Conv units, the last one pooling: (N, C_in, H, W) -> (N, C_out, H', W') (H' about H/2)."""

    def __init__(self, in_channels: int, channels: list[int], config: ConvNetConfig):
        super().__init__()
        widths = [in_channels, *channels]
        self.units = nn.ModuleList(
            ConvUnit(n_in, n_out, config.hidden_act, config.kernel_size, padding=config.padding,
                     batch_norm=config.batch_norm, pool=2 if i == len(channels) - 1 else 0)
            for i, (n_in, n_out) in enumerate(pairwise(widths)))

    def forward(self, x):
        for unit in self.units:
            x = unit(x)
        return x


class ConvNetForImageClassification(ImageClassifierModel):
    """Images (N, C, H, W) -> `stages` -> flatten -> `layers` -> `classifier` -> logits (N, num_labels)."""

    config_class = ConvNetConfig
    base_model_prefix = "convnet"
    _no_split_modules = ["ConvStage"]
    _feedback_points = {"micro": ("stages.*.units.*", "layers.*"), "macro": ("stages.*", "layers.*")}

    def __init__(self, config: ConvNetConfig):
        super().__init__(config)
        in_channels = [config.num_channels] + [stage[-1] for stage in config.conv_channels[:-1]]
        self.stages = nn.ModuleList(ConvStage(n_in, stage, config)
                                    for n_in, stage in zip(in_channels, config.conv_channels))
        widths = [config.conv_channels[-1][-1] * config.output_size() ** 2, *config.hidden_sizes]
        self.layers = nn.ModuleList(DenseUnit(n_in, n_out, config.hidden_act)
                                    for n_in, n_out in pairwise(widths))
        self.classifier = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def features(self, pixel_values):
        hidden = pixel_values
        for stage in self.stages:
            hidden = stage(hidden)
        hidden = hidden.flatten(1)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden
