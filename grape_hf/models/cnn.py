"""The paper's shallow CNN, "following the architectural details of LeNet-4" (LeCun et al. 1998):
conv 4@5x5 -> pool -> conv 16@5x5 -> pool -> dense 120 -> classifier. ReLU and max pooling are
guesses (LeNet-4 used squashing units and subsampling; the paper does not say)."""

from huggingface_hub.dataclasses import strict

from .convnet import ConvNetConfig, ConvNetForImageClassification


@strict
class CNNConfig(ConvNetConfig):
    """LeNet-4 for 32x32 inputs (the `ConvNetConfig` defaults)."""

    model_type = "grape_cnn"


class CNNForImageClassification(ConvNetForImageClassification):
    """LeNet-4. Feedback points: every layer in both settings (each stage holds one conv, so the macro
    point on a stage is the micro point on its conv unit)."""

    config_class = CNNConfig
    base_model_prefix = "cnn"
