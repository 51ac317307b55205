"""MeZO, "Fine-Tuning Language Models with Just Forward Passes" (Malladi et al. 2023, NeurIPS): zeroth-order SGD
(SPSA) with the seed trick, the BP-free baseline fine-tuners know.

One optimizer step (Algorithm 1 of the paper):
1. draw a seed s for the step; z ~ N(0, I), one tensor per trainable parameter, is regenerated from s each time it
   is needed and never stored;
2. L+ = loss at theta + eps z, L- = loss at theta - eps z: two forwards without autograd, on the same batch and with
   the same dropout masks (the random state is replayed, as in the paper's code);
3. theta comes back, and the projected gradient g = (L+ - L-) / (2 eps) gives every parameter the update direction
   g z. With plain SGD and learning rate lr, theta' = theta - lr g z: MeZO's update.

How it fits the Trainer's one backward (see ARCHITECTURE.md; no `.grad` written by hand, no nested backward): as
the forward gradient's, through `random_direction.py` (the seeded z, `ProjectedGradient`, g averaged over the
processes): the loss valued (L+ + L-) / 2, whose backward hands each trainable parameter `c g z`. That backward
touches no activation: the memory of a MeZO step is that of inference, plus the `.grad` buffers the Trainer's
optimizer reads (SGD for MeZO proper; AdamW and the rest work too).

Choices:
- The seed of step t and parameter `name` is `point_seed(feedback_seed, f"mezo:{t}:{name}")`
  (`random_direction.perturbation_seed`). One z per optimizer step; with gradient accumulation each micro-batch
  gets its own g, and the Trainer sums c g z over them.
- Restore: with `mezo_exact_restore` (default) a copy of the trainable parameters is kept during the two forwards
  and written back, so theta comes back bit for bit and both perturbations are rounded once from theta. The copy is
  freed before the backward; the gradients the Trainer's optimizer needs are as large and exist only after it, so
  without gradient accumulation the peak is unchanged (with it, the copy adds one set of trainable parameters to
  the accumulated gradients). Off, theta is restored in place as the paper's code does (theta += eps z, -= 2 eps z,
  += eps z): no copy, but each step leaves a rounding drift of up to one unit in the last place (measured on a tiny
  GPT-2: half the weights move, by 0.5 ulp on average; a random walk, max 8 ulp after 10 steps), i.e. ~5e-8 of a
  weight in float32 and ~2e-3 in bfloat16 weights, there larger than any update lr g z that bf16 can represent.
"""

import torch
from torch import nn

from .random_direction import RandomDirectionRule


class MeZO(RandomDirectionRule):
    """MeZO's training forward: two perturbed forwards without autograd, and the projected gradient tied to the loss.

    Attributes:
        eps: the perturbation scale (`mezo_eps`).
        exact_restore: restore theta from a copy (bitwise) instead of in place (`mezo_exact_restore`).
        seed: `feedback_seed`, from which every z is drawn (`random_direction.perturbation`).
    """

    name = "mezo"
    points_reason = ("it has no feedback points: no error is projected anywhere; every trainable parameter moves along "
                     "one shared random direction z, scaled by the loss difference of two perturbed forwards. The "
                     "locality audit and the alignment probe apply to 'dfa', 'grape' and 'drtp'.")
    clip_note = "Malladi et al. clip nothing (with SGD): set max_grad_norm=0 for MeZO's update."

    def __init__(self, model: nn.Module, args):
        super().__init__(model, args)
        self.eps = args.mezo_eps
        self.exact_restore = args.mezo_exact_restore

    def forward(self, forward, inputs: dict, step: int, first_micro_batch: bool) -> tuple[torch.Tensor, object]:
        """MeZO's two forwards on `inputs` (`forward(inputs)` is the Trainer's loss computation, returning (loss,
        outputs)). Returns (loss, outputs): the loss valued (L+ + L-) / 2, whose backward gives every trainable
        parameter g z; the outputs are those of the second forward (at theta - eps z)."""
        parameters = self.trainable()
        draw = self.draw(step, parameters)
        device = parameters[0][1].device
        with torch.no_grad():
            saved = [p.detach().clone() for _, p in parameters] if self.exact_restore else None
            offset = 0  # theta + offset * eps z is in the parameters now (in-place restore)
            try:
                self._shift(parameters, draw(), 1.0)
                offset = 1
                # Replay the random state in the second forward: the same dropout masks at theta +- eps z.
                devices = [device] if device.type != "cpu" else []
                with torch.random.fork_rng(devices=devices, device_type=device.type):
                    plus, _ = self._run(forward, inputs)
                if saved is None:
                    self._shift(parameters, draw(), -2.0)
                else:  # theta - eps z, rounded once from theta
                    for (_, p), theta, z in zip(parameters, saved, draw()):
                        p.copy_(theta).sub_(z, alpha=self.eps)
                offset = -1
                minus, outputs = self._run(forward, inputs)
            finally:  # theta comes back even when a forward raised
                if saved is not None:
                    for (_, p), theta in zip(parameters, saved):
                        p.copy_(theta)
                elif offset:
                    self._shift(parameters, draw(), -offset)
            del saved
            g = self._average((plus.detach().float() - minus.detach().float()) / (2 * self.eps))
        return self.projected((plus.detach() + minus.detach()) / 2, g, draw, parameters), outputs

    def _shift(self, parameters: list[tuple[str, nn.Parameter]], directions, times: float) -> None:
        """Add `times * eps * z` to every parameter, in place."""
        for (_, p), z in zip(parameters, directions):
            p.add_(z, alpha=times * self.eps)
