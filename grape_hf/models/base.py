"""What every grape_hf image classifier shares: the forward contract, the loss, the weight init and
the feedback-point declaration read by `grape_hf.direct.placement`.

A model declares its feedback points in `_feedback_points`: setting ("micro", "macro") -> module-name
patterns (`*` stands for one dotted component, as in `feedback_modules`). Each point is a *unit*: a
weight layer with its local nonlinearity (and pooling), so DFA's feedback reaches the layer's weights
through exactly those local operations.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput


class ImageClassifierModel(PreTrainedModel):
    """Base of the grape_hf image classifiers: subclasses build `self.classifier` (the output layer,
    the error tap's module) and implement `features(pixel_values) -> (N, classifier.in_features)`."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _feedback_points: dict[str, tuple[str, ...]] = {}

    def _init_weights(self, module):
        super()._init_weights(module)  # norms: weight 1, bias 0, running stats reset
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # torch's own default (kaiming uniform, a=sqrt(5)), not the 0.02 normal meant for transformers.
            init.kaiming_uniform_(module.weight, a=5 ** 0.5)
            if module.bias is not None:
                bound = 1 / module.in_features ** 0.5
                init.uniform_(module.bias, -bound, bound)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, classifier.in_features), the classifier's input."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                return_dict: bool | None = None) -> ImageClassifierOutput | tuple:
        """Logits (N, num_labels) of images `pixel_values` (N, C, H, W); cross-entropy loss when
        `labels` (N,) are given."""
        self._check_pixels(pixel_values)
        logits = self.classifier(self.features(pixel_values))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects pixel_values of shape (N, {', '.join(map(str, expected))}) but got "
                f"{tuple(pixel_values.shape)}. Resize the images to {config.image_size}x{config.image_size} with "
                f"{config.num_channels} channels, or build the model with num_channels/image_size matching the data."
            )
