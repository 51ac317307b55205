"""FA, Feedback Alignment (Lillicrap et al. 2016, "Random synaptic feedback weights support error
backpropagation for deep learning", Nat. Commun. 7:13276): backpropagation in which every weight layer
hands the layer below `B^T δ` instead of `W^T δ`, with `B` a fixed random matrix of `W`'s shape. The
layer's own weight and bias gradients stay the true local ones (`δ h_{l-1}^T`), and the error still
travels layer by layer through the nonlinearities' true derivatives: FA is sequential, unlike DFA.

Mechanism (no second backward, no `.grad` written by hand): a forward pre-hook gives each nn.Linear /
nn.Conv2d a detached copy of its input, so the layer's own backward computes only its weight and bias
gradients; a forward hook then passes the layer's output through `RandomFeedback`, whose backward hands
the output gradient on unchanged and gives the (real, undetached) input `δ B` (linear) or the transposed
convolution of `δ` with `B` (conv). The Trainer's one `accelerator.backward(loss)` does the rest.
"""

import math

import torch
from torch import nn

from ..rule import Rule

FA_LAYERS = (nn.Linear, nn.Conv2d)


def feedback_input_grad(layer: nn.Module, matrix: torch.Tensor, grad_output: torch.Tensor,
                        input_shape: torch.Size) -> torch.Tensor:
    """The gradient FA hands the layer's input: `W^T δ` of backpropagation with `B` in place of `W`.

    Args:
        layer: the nn.Linear or nn.Conv2d (its stride, padding, dilation, groups).
        matrix: B, (out_features, in_features) or (out_channels, in_channels/groups * kh * kw), float32.
        grad_output: δ, (*lead, out_features) or (N, out_channels, H', W').
        input_shape: (*lead, in_features) or (N, in_channels, H, W).
    Returns:
        (*input_shape) tensor in `grad_output`'s dtype.
    """
    weight = matrix.to(grad_output.dtype).view(layer.weight.shape)
    if isinstance(layer, nn.Linear):
        return grad_output @ weight
    return torch.nn.grad.conv2d_input(input_shape, weight, grad_output, layer.stride, layer.padding,
                                      layer.dilation, layer.groups)


class RandomFeedback(torch.autograd.Function):
    """Forward: the layer's output unchanged. Backward: δ for the output, `feedback_input_grad` for
    the layer's input (which the layer itself saw detached)."""

    @staticmethod
    def forward(ctx, layer: nn.Module, matrix: torch.Tensor, output: torch.Tensor, layer_input: torch.Tensor):
        ctx.layer = layer
        ctx.matrix = matrix
        ctx.input_shape = layer_input.shape
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return None, None, grad_output, feedback_input_grad(ctx.layer, ctx.matrix, grad_output, ctx.input_shape)


def fa_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The weight layers of `model` by name (nn.Linear, nn.Conv2d); raises a `ValueError` naming every
    other module that holds trainable parameters, since FA defines no feedback for it."""
    layers, others = {}, []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, FA_LAYERS):
            if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.padding_mode != "zeros"):
                raise ValueError(f"FA needs numeric zero padding in {name!r} ({module}); give it padding=<int> and "
                                 "padding_mode='zeros'.")
            layers[name] = module
        else:
            others.append(f"{name} ({type(module).__name__})")
    if others:
        raise ValueError(
            f"FA replaces W^T by a random B in nn.Linear and nn.Conv2d layers only (MLPs and CNNs, as in Lillicrap "
            f"et al. 2016), but {type(model).__name__} has other modules with weights: {', '.join(others)}. Use "
            "rule='dfa' or 'grape' for this model."
        )
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable nn.Linear or nn.Conv2d layer for FA.")
    return layers


class FA(Rule):
    """FA's hooks on every weight layer of a model, and their random matrices.

    Attributes:
        layers: the nn.Linear / nn.Conv2d layers by name, in registration order (`point_names`).
        matrices: B by layer name, (out_features, fan_in), created on first use from `feedback_init` and
            `feedback_seed`: variance 1/fan_in for 'normal', the scale of a default weight. The first
            layer, whose input needs no gradient, never uses its matrix.
    """

    name = "fa"
    points_reason = ("FA sends the error through every layer in turn, so there is no segment to isolate and no "
                     "point to probe. The locality audit, like the probe, applies to 'dfa', 'grape' and 'drtp'.")

    def __init__(self, model: nn.Module, args):
        layers = fa_layers(model)
        super().__init__(model, args)
        self.layers = layers
        self.point_names = tuple(layers)
        self.head = self.point_names[-1]
        self._inputs: dict[str, list[torch.Tensor]] = {}  # layer -> inputs awaiting their output hook
        for name, layer in layers.items():
            self.hook(layer.register_forward_pre_hook(self._make_input_hook(name)))
            self.hook(layer.register_forward_hook(self._make_output_hook(name)))

    def remove(self) -> None:
        super().remove()
        self._inputs.clear()

    def _make_input_hook(self, name: str):
        def detach_input(module, args):
            if not self._active() or not args[0].requires_grad:
                return None
            self._inputs.setdefault(name, []).append(args[0])
            return (args[0].detach(), *args[1:])
        return detach_input

    def _make_output_hook(self, name: str):
        def feedback(module, args, output):
            waiting = self._inputs.get(name)
            if not self._active() or not waiting:
                return None
            matrix = self.matrices.get(name, module.weight.shape[0], math.prod(module.weight.shape[1:]),
                                       output.device)
            return RandomFeedback.apply(module, matrix, output, waiting.pop())
        return feedback
