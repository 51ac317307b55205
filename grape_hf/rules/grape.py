"""GrAPE: DFA whose feedback matrices are aligned, step by step, to forward-mode Jacobian estimates.

Estimate (Algorithm 1 of the paper, rank-1 form of the revision): in the training forward itself,
`grape_hf.direct.estimate` perturbs every point's forward tangent and reads `T_k`, an unbiased
estimate of `J_k^T`, without any backward pass.

Update, between that forward and the backward, so the backward projects through the refined
matrices: one SGD step on `1 - cos(B_k, T_k)`, then renormalisation. The step is taken on the
unit-norm matrix ('frobenius') or on unit columns ('columns'), so `grape_lr` means the same
rotation whatever the matrix size. With `grape_smoothing` the step aims at a running average of
the estimates; with `grape_update_steps` N > 1 it estimates every N-th step and steps towards the
average in between.
"""

import contextlib

import torch

from ..direct.estimate import EPS, estimating_forward
from .dfa import DFA


def align_step(matrix: torch.Tensor, target: torch.Tensor, lr: float, alignment: str) -> torch.Tensor:
    """One SGD step on `1 - cos(B, T)` followed by renormalisation; returns the new B (same norms).

    'frobenius': on `B / |B|`, the gradient of `-cos` is `-(T/|T| - cos B/|B|)`; the result is
    rescaled to `|B|`. 'columns': the same for every column on its own, each keeping its norm.
    """
    dim = None if alignment == "frobenius" else 0
    norm = matrix.norm(dim=dim, keepdim=dim is not None).clamp_min(EPS)
    unit = matrix / norm
    unit_target = target / target.norm(dim=dim, keepdim=dim is not None).clamp_min(EPS)
    cos = (unit * unit_target).sum(dim=dim, keepdim=dim is not None)
    stepped = unit + lr * (unit_target - cos * unit)
    return stepped / stepped.norm(dim=dim, keepdim=dim is not None).clamp_min(EPS) * norm


class GrAPE(DFA):
    """DFA plus the alignment of every `B_k` to its smoothed Jacobian estimate.

    Attributes:
        targets: the smoothed estimates of `J_k^T` by point, (point_features, error_features).
        lr, smoothing, decay: `grape_lr`, `grape_smoothing`, `grape_ema_decay`.
    """

    name = "grape"

    def __init__(self, model, args, placement=None):
        super().__init__(model, args, placement)
        self.lr = args.grape_lr
        self.smoothing = args.grape_smoothing
        self.decay = args.grape_ema_decay
        self.targets: dict[str, torch.Tensor] = {}
        self._before_update = None  # (matrices, targets, estimates_seen) before this step's update: `end_step`

    def estimate_every(self, args) -> int:
        """GrAPE estimates every `grape_update_steps` steps."""
        return args.grape_update_steps

    def forward(self, forward, inputs, step, first_micro_batch):
        """On the first micro-batch of each optimizer step (so every micro-batch of a
        gradient-accumulation step uses the same matrices): the forward (estimating when due), then
        the update of the matrices, before the caller's backward."""
        if not first_micro_batch:
            return forward(inputs)
        estimating = step % self.estimate_steps == 0
        with self.estimator.estimating(self.model) if estimating else contextlib.nullcontext() as estimate:
            result = forward(inputs)
        # Every update replaces tensors, never writes into them: keeping references is a full snapshot.
        self._before_update = (dict(self.matrices.tensors), dict(self.targets), self.estimator.estimates_seen)
        estimates = self.estimator.targets(estimate) if estimating else {}
        self.update(estimates)
        if estimates:
            self.log_alignment(estimates)
        return result

    def update(self, estimates: dict[str, torch.Tensor]) -> None:
        """Smooth `estimates` into `targets` and take one alignment step of every matrix towards
        its target. With no estimates, step towards the smoothed targets."""
        matrices = self.matrices.tensors
        for name, estimate in estimates.items():
            previous = self.targets.get(name)
            previous = previous if previous is None else previous.to(estimate.device)
            if previous is None or self.smoothing == "none":
                self.targets[name] = estimate
            elif self.smoothing == "cma":
                self.targets[name] = previous + (estimate - previous) / self.estimator.estimates_seen
            else:
                self.targets[name] = self.decay * previous + (1 - self.decay) * estimate
        for name, target in self.targets.items():
            target = self.targets[name] = target.to(matrices[name].device)  # loaded from a checkpoint on CPU
            matrices[name] = align_step(matrices[name], target, self.lr, self.alignment)

    def end_step(self, skipped: bool) -> None:
        """Close the optimizer step of the last `update`: keep the update or, when the optimizer
        skipped the step (fp16 overflow), restore the matrices and smoothing state from before it,
        so the feedback stays in step with the model. The perturbation generator is not rewound:
        the next estimate draws fresh perturbations."""
        if skipped and self._before_update is not None:
            matrices, targets, estimates_seen = self._before_update
            self.matrices.tensors = dict(matrices)
            self.targets = dict(targets)
            self.estimator.estimates_seen = estimates_seen
        self._before_update = None

    def as_trained(self):
        """The audit sees GrAPE's training forward: dual tensors with perturbed tangents (drawn from
        a generator of its own, so the estimator's is not advanced)."""
        model = self.model
        generator = torch.Generator(device=model.device).manual_seed(0)
        return estimating_forward(self.network, model, lambda name, like: torch.randn(
            like.shape, generator=generator, device=like.device, dtype=like.dtype))

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The estimator's entries plus `aligner.targets.<point>`, the smoothed estimates."""
        state = super().extra_state()
        state.update({f"aligner.targets.{name}": target for name, target in self.targets.items()})
        return state

    def load_aligner_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        self.targets = {key.removeprefix("targets."): value for key, value in state.items()
                        if key.startswith("targets.")}
        super().load_aligner_state({k: v for k, v in state.items() if not k.startswith("targets.")}, where)
        self._before_update = None
