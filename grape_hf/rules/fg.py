"""Forward gradient, "Gradients without Backpropagation" (Baydin et al. 2022): the weight-perturbed forward
gradient, the BP-free baseline that GrAPE's Jacobian estimates are to beat (issue 23).

One optimizer step (Algorithm 1 of the paper):
1. v ~ N(0, I), one tensor per trainable parameter, drawn from a seed of the step (never stored: regenerated when
   needed);
2. one forward with forward-mode AD, every trainable parameter carrying the tangent v: the loss's tangent is the
   directional derivative g = grad L . v (exact, not a finite difference);
3. the forward gradient g v, an unbiased estimate of grad L (E[v v^T] = I). With plain SGD and learning rate lr,
   theta' = theta - lr g v.

How it fits the Trainer's one backward, exactly as MeZO's, through `random_direction.py` (the seeded directions,
`ProjectedGradient`, g averaged over the processes): the rule's forward returns a scalar whose value is L(theta)
(what the Trainer logs) and whose backward hands every trainable parameter `c g v`. The forward runs under
`torch.no_grad()` (forward-mode AD does not need autograd): no graph through the model, no backprop, and the memory
of inference plus the tangents (one activation-sized tangent per live activation, one set of parameter-sized
directions). So the Trainer's optimizer (SGD for the paper's
update; AdamW and the rest work too), schedulers, clipping, accumulation and checkpoints run unchanged.

Choices:
- The dual parameters: `torch.func.functional_call` swaps each trainable parameter for `make_dual(p, v)` for the
  duration of the Trainer's loss computation, tied weights included (GPT-2's head is its input embedding: both
  carry the one v), and puts the parameters back after. The model's ops run on `direct/forward_ad.py`'s kernels
  (`estimating_kernels`: attention with an explicit tangent, since SDPA's fused kernels have no forward AD).
- The seed of step t and parameter `name` is `point_seed(feedback_seed, f"fg:{t}:{name}")`
  (`random_direction.perturbation_seed`). One forward, so the dropout masks need no replay. With gradient
  accumulation each micro-batch gets its own g along the step's one v; the Trainer sums c g v.
- The forward is checked: it must call the model (else nothing was perturbed) and its loss must carry a tangent
  (else g would be 0, or absent, and nothing would train under the rule's name).
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from ..direct.forward_ad import estimating_kernels
from .random_direction import RandomDirectionRule


class _Calling(nn.Module):
    """`model` as a submodule, so that `functional_call` can swap its parameters around `run()`, a call that is not
    the model's own forward (the Trainer's loss computation, which calls the model, possibly DDP-wrapped)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, run):
        return run()


class ForwardGradient(RandomDirectionRule):
    """The forward gradient's training forward: one forward with dual parameters, the gradient g v tied to the loss.

    Attributes:
        seed: `feedback_seed`, from which every v is drawn (`random_direction.perturbation` with tag 'fg').
    """

    name = "fg"
    points_reason = ("it has no feedback points: no error is projected anywhere; every trainable parameter moves along "
                     "one shared random direction v, scaled by the loss's directional derivative along v from one "
                     "forward-mode pass. The locality audit and the alignment probe apply to 'dfa', 'grape' and "
                     "'drtp'.")
    direction = "v"
    clip_note = "Baydin et al. clip nothing (with SGD): set max_grad_norm=0 for their update."

    def forward(self, forward, inputs: dict, step: int, first_micro_batch: bool) -> tuple[torch.Tensor, object]:
        """One forward of `inputs` with every trainable parameter carrying its tangent v (`forward(inputs)` is the
        Trainer's loss computation, returning (loss, outputs)). Returns (loss, outputs): the loss valued L(theta),
        whose backward gives every trainable parameter g v; the outputs without tangents."""
        parameters = self.trainable()
        draw = self.draw(step, parameters)
        model = self.model
        with torch.no_grad(), fwAD.dual_level(), estimating_kernels(model):
            duals = {f"model.{name}": fwAD.make_dual(p, v) for (name, p), v in zip(parameters, draw())}
            loss, outputs = functional_call(_Calling(model), duals, (lambda: self._run(forward, inputs),))
            del duals
            if not isinstance(loss, torch.Tensor) or fwAD.unpack_dual(loss).tangent is None:
                raise RuntimeError(
                    f"rule='fg' ran {type(model).__name__} with its trainable parameters carrying the tangent v, but "
                    "the training loss carries no tangent: it was not computed from the model's outputs (a custom "
                    "compute_loss that detaches them, or a loss of something else), so the forward gradient would "
                    "be 0 and nothing would train. Compute the loss from the outputs of the model the GrapeTrainer "
                    "was given.")
            value, tangent = fwAD.unpack_dual(loss)
            g = self._average(tangent.detach().float().clone())
            value = value.detach().clone()
        # Leaving the dual level stripped the tangents from the outputs: plain tensors for the Trainer.
        return self.projected(value, g, draw, parameters), outputs
