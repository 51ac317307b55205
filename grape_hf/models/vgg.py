"""VGG-16 sized for 32x32 inputs: the 13 3x3 convolutions of VGG-16 in its five stages (32 -> 1 pixel
after the fifth pooling), then dense layers of 512 (not 4096) and the classifier: 16 weight layers.
`batch_norm=True` gives VGG-16-BN."""

from huggingface_hub.dataclasses import strict

from .convnet import ConvNetConfig, ConvNetForImageClassification


@strict
class VGGConfig(ConvNetConfig):
    """VGG-16 for 32x32 inputs (batch_norm=True: VGG-16-BN)."""

    model_type = "grape_vgg"
    conv_channels: list[list[int]] | tuple = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                              (512, 512, 512))
    kernel_size: int = 3
    padding: int = 1
    hidden_sizes: list[int] | tuple = (512, 512)


class VGGForImageClassification(ConvNetForImageClassification):
    """VGG-16(-BN). Feedback points: micro = every layer; macro = every stage (VGG's blocks) and every
    dense layer."""

    config_class = VGGConfig
    base_model_prefix = "vgg"
