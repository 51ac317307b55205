"""DRTP, Direct Random Target Projection (Frenkel, Lefebvre & Bol 2021, "Learning without feedback: fixed
random learning signals allow for feedforward training of deep neural networks", Front. Neurosci.
15:629892): DFA with the one-hot target `y*` projected instead of the error. Point k receives `B_k y*`
(the paper's `δy_k = B_k^T y* ⊙ f'(y_k)`, its code's `labels.mm(B)`): for classification the target
carries the error's sign (`e = y - y*`), so no error needs to travel back to the hidden layers and
they can update as soon as the forward pass reaches them. The output layer still gets the true error.

The points, cuts and tap are DFA's (`FeedbackNetwork`); only what the tap projects changes
(`signal_for_forward`). The labels are read from the model call (`labels=`), and the scale follows the
loss the way `e` does: the signal is `c y* / N`, with N the examples in the batch (the mean of the
loss) and `c` the gradient that reaches the model's loss (loss scaling, gradient accumulation),
read by `LossGrad` in the same backward.
"""

import torch

from ..direct.matrices import position_weights
from ..direct.placement import resolve_placement
from .dfa import DFA


class Target:
    """The signal of one training forward: its labels (N,), read from the model call, and `loss_grad`,
    the gradient that reaches the model's loss in that forward's backward (None until then, as in
    the locality audit, whose backward starts at the tap: then 1)."""

    def __init__(self, labels: torch.Tensor | None):
        self.labels = labels
        self.loss_grad: torch.Tensor | None = None

    def __call__(self, error: torch.Tensor) -> torch.Tensor:
        """`c y* / N`: the one-hot target (N, classes) in place of the error (N, classes). For logits per
        position (N, S, classes) of which the model pools one per example (GPT-2's sequence classifier reads
        the last real token), the target sits where the loss reads them: the positions whose error is not
        zero, shared equally among them."""
        labels = self.labels
        if labels is None:
            raise ValueError("DRTP projects the one-hot target, but the model was called without labels=...: pass the "
                             "class labels in the batch ('labels' column).")
        if labels.dim() != 1 or labels.is_floating_point() or error.dim() not in (2, 3) or len(labels) != len(error):
            raise ValueError(
                f"DRTP needs one class index per example: labels of shape (N,) for logits (N, classes) or (N, "
                f"positions, classes), as in image or sequence classification; got labels {tuple(labels.shape)} "
                f"({labels.dtype}) for logits {tuple(error.shape)}."
            )
        scale = 1.0 if self.loss_grad is None else self.loss_grad.to(error.dtype)
        target = torch.nn.functional.one_hot(labels.to(error.device), error.shape[-1]).to(error.dtype)
        if error.dim() == 3:
            read = error.ne(0).any(-1).to(error.dtype)  # (N, S): the positions the pooled loss depends on
            target = target[:, None, :] * position_weights(read)[..., None]
        return target * scale / len(labels)


class LossGrad(torch.autograd.Function):
    """Forward: a copy of the loss (a copy, so that the Trainer may scale it in place). Backward: keeps
    the gradient reaching the loss in the forward's `Target`."""

    @staticmethod
    def forward(ctx, target: Target, loss: torch.Tensor):
        ctx.target = target
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.target.loss_grad = grad
        return None, grad


class DRTP(DFA):
    """DFA's points, cuts and tap, projecting each forward's `Target` instead of the error."""

    name = "drtp"

    def __init__(self, model, args, placement=None):
        placement = placement if placement is not None else resolve_placement(model, args)
        if placement.error_point != "logits":
            raise ValueError(
                f"DRTP projects the one-hot target, which lives where the logits do, but the error of "
                f"{type(model).__name__} is read at the head's input (error_point='{placement.error_point}'). Use "
                "error_point='logits' on a classifier."
            )
        super().__init__(model, args, placement)
        self._target: Target | None = None  # this forward's, from its start to the tap
        self.hook(model.register_forward_pre_hook(self._read_labels, with_kwargs=True))
        self.hook(model.register_forward_hook(self._watch_loss))

    def signal_for_forward(self) -> Target:
        """The signal the tap projects in this forward."""
        return self._target if self._target is not None else Target(None)

    def _read_labels(self, module, args, kwargs):
        self._target = Target(kwargs.get("labels")) if self._active() else None

    def _watch_loss(self, module, args, output):
        # A ModelOutput or dict with a loss; a model returning tuples keeps c = 1 (no loss scaling seen).
        loss = output.get("loss") if isinstance(output, dict) else None
        if not self._active() or self._target is None or loss is None or not loss.requires_grad:
            return None
        output["loss"] = LossGrad.apply(self._target, loss)
        return output
