"""Hugging Face-native image classifiers of the paper (MLP, LeNet-style CNN, AlexNet, VGG-16, ResNet-20/56),
each a `PretrainedConfig` + `PreTrainedModel` registered with `AutoConfig` and
`AutoModelForImageClassification`, plus transformers' own ViT at CIFAR size.

Importing this package (or `grape_hf`) registers the Auto classes, so a saved model reloads with
`AutoModelForImageClassification.from_pretrained(path)`.
"""

import dataclasses

from transformers import (AutoConfig, AutoModelForImageClassification, PreTrainedModel, ViTConfig,
                          ViTForImageClassification)

from .alexnet import AlexNetConfig, AlexNetForImageClassification
from .cnn import CNNConfig, CNNForImageClassification
from .convnet import ConvNetConfig, ConvNetForImageClassification
from .mlp import MLPConfig, MLPForImageClassification
from .resnet import CifarResNetConfig, CifarResNetForImageClassification
from .vgg import VGGConfig, VGGForImageClassification

MODEL_NAMES = ("mlp", "cnn", "alexnet", "vgg16", "vgg16_bn", "resnet20", "resnet56", "vit")

# ViT at CIFAR size: patches of 4 (64 tokens for 32x32), ViT-Tiny widths (192, 3 heads, MLP 768) and
# 6 layers instead of 12; no dropout, as in the paper's runs ("no further regularization").
VIT_CIFAR = dict(patch_size=4, hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

# name -> (config class, model class, the config fields that make it that model)
_CATALOGUE = {
    "mlp": (MLPConfig, MLPForImageClassification, {}),
    "cnn": (CNNConfig, CNNForImageClassification, {}),
    "alexnet": (AlexNetConfig, AlexNetForImageClassification, {}),
    "vgg16": (VGGConfig, VGGForImageClassification, {}),
    "vgg16_bn": (VGGConfig, VGGForImageClassification, {"batch_norm": True}),
    "resnet20": (CifarResNetConfig, CifarResNetForImageClassification, {"depth": 20}),
    "resnet56": (CifarResNetConfig, CifarResNetForImageClassification, {"depth": 56}),
    "vit": (ViTConfig, ViTForImageClassification, VIT_CIFAR),
}

# name -> the config's `model_type` (what grape_hf.recommended.REGIMES is keyed by).
MODEL_TYPES = {name: config_class.model_type for name, (config_class, _, _) in _CATALOGUE.items()}

# Our own classes (ViT is transformers' and registered there).
for _config_class, _model_class in ((MLPConfig, MLPForImageClassification),
                                    (ConvNetConfig, ConvNetForImageClassification),
                                    (CNNConfig, CNNForImageClassification),
                                    (AlexNetConfig, AlexNetForImageClassification),
                                    (VGGConfig, VGGForImageClassification),
                                    (CifarResNetConfig, CifarResNetForImageClassification)):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForImageClassification.register(_config_class, _model_class, exist_ok=True)


def build_image_model(name: str, num_labels: int, num_channels: int, image_size: int,
                      **config_overrides) -> PreTrainedModel:
    """A freshly initialised classifier `name` (one of `MODEL_NAMES`) for images (N, num_channels,
    image_size, image_size) and `num_labels` classes; `config_overrides` set other config fields
    (e.g. hidden_size=64 for a small MLP, conv_channels=[[8], [8]] for a narrow CNN)."""
    if name not in _CATALOGUE:
        raise ValueError(f"Unknown image model {name!r}; choose one of {', '.join(MODEL_NAMES)}.")
    config_class, model_class, fields = _CATALOGUE[name]
    own = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(config_overrides) - set(own))
    if unknown:  # a PretrainedConfig would keep a misspelt field as an unused attribute
        raise ValueError(f"{config_class.__name__} has no field {', '.join(unknown)}; its fields are {', '.join(own)}.")
    config = config_class(num_labels=num_labels, num_channels=num_channels, image_size=image_size,
                          **{**fields, **config_overrides})
    return model_class(config)


__all__ = [
    "MODEL_NAMES",
    "AlexNetConfig",
    "AlexNetForImageClassification",
    "CNNConfig",
    "CNNForImageClassification",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "ConvNetConfig",
    "ConvNetForImageClassification",
    "MLPConfig",
    "MLPForImageClassification",
    "VGGConfig",
    "VGGForImageClassification",
    "build_image_model",
]
