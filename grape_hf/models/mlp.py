"""The paper's multilayer perceptron: `num_hidden_layers` dense units of `hidden_size`, then the classifier.

Paper (section 4): "3 layers FFNNs, with hidden size 1024", read here as three hidden layers of 1024
(four weight layers in all) with ReLU; the paper names neither the count convention nor the nonlinearity.
"""

from itertools import pairwise

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .base import ImageClassifierModel
from .units import DenseUnit


@strict
class MLPConfig(PretrainedConfig):
    """Configuration of `MLPForImageClassification` (num_labels as in every `PretrainedConfig`)."""

    model_type = "grape_mlp"
    num_channels: int = 3
    image_size: int = 32
    hidden_size: int = 1024
    num_hidden_layers: int = 3
    hidden_act: str = "relu"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_hidden_layers < 1 or self.hidden_size < 1:
            raise ValueError(f"MLPConfig needs num_hidden_layers >= 1 and hidden_size >= 1, got "
                             f"{self.num_hidden_layers} and {self.hidden_size}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is unknown; use a transformers activation such as "
                             "'relu', 'tanh' or 'gelu'.")


class MLPForImageClassification(ImageClassifierModel):
    """Flattened image (N, C*H*W) -> `layers` (N, hidden_size) each -> `classifier` -> logits (N, num_labels).

    Feedback points: every hidden layer's output (`layers.*`) in both settings: an MLP has no blocks,
    so macro is per layer too.
    """

    config_class = MLPConfig
    base_model_prefix = "mlp"
    _feedback_points = {"micro": ("layers.*",), "macro": ("layers.*",)}

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        widths = [config.num_channels * config.image_size ** 2] + [config.hidden_size] * config.num_hidden_layers
        self.layers = nn.ModuleList(DenseUnit(n_in, n_out, config.hidden_act)
                                    for n_in, n_out in pairwise(widths))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def features(self, pixel_values):
        hidden = pixel_values.flatten(1)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden
