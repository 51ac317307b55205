"""DRTP, Direct Random Target Projection (Frenkel, Lefebvre & Bol 2021, "Learning without feedback: fixed
random learning signals allow for feedforward training of deep neural networks", Front. Neurosci.
15:629892): DFA with the one-hot target `y*` projected instead of the error. Point k receives `B_k y*`
(the paper's `δy_k = B_k^T y* ⊙ f'(y_k)`, its code's `labels.mm(B)`): for classification the target
carries the error's sign (`e = y - y*`), so no error needs to travel back to the hidden layers and
they can update as soon as the forward pass reaches them. The output layer still gets the true error.

The points, cuts and hub are DFA's (`FeedbackNetwork`); only what the hub projects changes
(`point_signal`). The labels are read from the model call (`labels=`), and the scale follows the
loss the way `e` does: the signal is `c y* / N`, with N the examples in the batch (the mean of the
loss) and `c` the gradient that reaches the model's loss (loss scaling, gradient accumulation),
read by `LossGrad` in the same backward.
"""

import torch

from ..points import FeedbackNetwork, install


class LossGrad(torch.autograd.Function):
    """Forward: the loss unchanged. Backward: keeps the gradient reaching the loss in `network.loss_grad`."""

    @staticmethod
    def forward(ctx, network: "TargetProjection", loss: torch.Tensor):
        ctx.network = network
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.network.loss_grad = grad
        return None, grad


class TargetProjection(FeedbackNetwork):
    """DFA's feedback network whose points receive the projected one-hot target.

    Attributes:
        labels: the class labels (N,) of the last training forward.
        loss_grad: the gradient that reached the model's loss in the running backward (None until then:
            the locality audit, whose backward starts at the tap, uses 1).
    """

    def __init__(self, model, placement, matrices):
        if placement.error_point != "logits":
            raise ValueError(
                f"DRTP projects the one-hot target, which lives where the logits do, but the error of "
                f"{type(model).__name__} is read at the head's input (error_point='{placement.error_point}'). Use "
                "error_point='logits' on a classifier."
            )
        super().__init__(model, placement, matrices)
        self.labels: torch.Tensor | None = None
        self.loss_grad: torch.Tensor | None = None
        self._handles.append(model.register_forward_pre_hook(self._read_labels, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._watch_loss))

    def _read_labels(self, module, args, kwargs):
        if self._active():
            self.labels = kwargs.get("labels")
            self.loss_grad = None

    def _watch_loss(self, module, args, output):
        # A ModelOutput or dict with a loss; a model returning tuples keeps c = 1 (no loss scaling seen).
        loss = output.get("loss") if isinstance(output, dict) else None
        if not self._active() or self._observing or loss is None or not loss.requires_grad:
            return None
        output["loss"] = LossGrad.apply(self, loss)
        return output

    def point_signal(self, error: torch.Tensor) -> torch.Tensor:
        """`c y* / N`: the one-hot target (N, classes) in place of the error (N, classes)."""
        labels = self.labels
        if labels is None:
            raise ValueError("DRTP projects the one-hot target, but the model was called without labels=...: pass the "
                             "class labels in the batch ('labels' column).")
        if labels.dim() != 1 or labels.is_floating_point() or error.dim() != 2 or len(labels) != len(error):
            raise ValueError(
                f"DRTP needs one class index per example: labels of shape (N,) for logits (N, classes), as in image "
                f"classification; got labels {tuple(labels.shape)} ({labels.dtype}) for logits {tuple(error.shape)}."
            )
        scale = 1.0 if self.loss_grad is None else self.loss_grad.to(error.dtype)
        target = torch.nn.functional.one_hot(labels.to(error.device), error.shape[-1]).to(error.dtype)
        return target * scale / len(labels)


def build(model, args) -> TargetProjection:
    """DFA's points, cuts and tap of `args.setting` on `model`, projecting the target (error_point must be 'logits')."""
    return install(model, args, TargetProjection)
