"""AlexNet sized for 32x32 inputs: torchvision's AlexNet widths (conv 64, 192, 384, 256, 256; dense
layers before the classifier), with 3x3 convolutions, 2x2 pooling after conv1, conv2 and conv5
(32 -> 16 -> 8 -> 4) and dense layers of 1024 instead of 4096. The paper names no CIFAR variant:
these sizes are our choice."""

from huggingface_hub.dataclasses import strict

from .convnet import ConvNetConfig, ConvNetForImageClassification


@strict
class AlexNetConfig(ConvNetConfig):
    """AlexNet for 32x32 inputs."""

    model_type = "grape_alexnet"
    conv_channels: list[list[int]] | tuple = ((64,), (192,), (384, 256, 256))
    kernel_size: int = 3
    padding: int = 1
    hidden_sizes: list[int] | tuple = (1024, 1024)


class AlexNetForImageClassification(ConvNetForImageClassification):
    """AlexNet. Feedback points: micro = every layer; macro = every pooling stage (conv3-5 form one)
    and every dense layer."""

    config_class = AlexNetConfig
    base_model_prefix = "alexnet"
