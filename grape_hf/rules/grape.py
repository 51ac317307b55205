"""GrAPE: DFA whose feedback matrices are aligned, step by step, to forward-mode Jacobian estimates.

Estimate (Algorithm 1 of the paper, rank-1 form of the revision): in the training forward itself,
`grape_hf.direct.estimate` perturbs every point's forward tangent and reads `T_k`, an unbiased
estimate of `J_k^T`, without any backward pass. `grape_estimator='residual'` reads it with the current
matrices as a control variate (as unbiased, less noisy as they align); `grape_estimate_stride` N > 1 moves
it to a forward of its own, without autograd and stopped at the error tap, on every N-th row of the batch
(cheaper than tangents on the whole training forward).

Update, between that forward and the backward, so the backward projects through the refined
matrices: one SGD step on `1 - cos(B_k, T_k)`, then renormalisation. The step is taken on the
unit-norm matrix ('frobenius') or on unit columns ('columns'), so `grape_lr` means the same
rotation whatever the matrix size. With `grape_smoothing` the step aims at a running average of
the estimates; with `grape_update_steps` N > 1 it estimates every N-th step and steps towards the
average in between.

An update that would make a matrix or a target non-finite (a NaN or inf estimate from one bad
batch, an overflow of float32) is skipped whole and counted (`grape/skipped_updates` in the logs):
the feedback stays as it was, and training goes on.
"""

import contextlib
import logging

import torch

from ..diagnostics.probe import leaving_no_trace
from ..direct.estimate import EPS, estimating_forward
from ..direct.matrices import nonfinite_problem
from ..direct.network import TapReached
from .dfa import ALIGNER, DFA

logger = logging.getLogger(__name__)


def align_step(matrix: torch.Tensor, target: torch.Tensor, lr: float, alignment: str,
               track_scale: bool = False) -> torch.Tensor:
    """One SGD step on `1 - cos(B, T)` followed by renormalisation; returns the new B.

    'frobenius': on `B / |B|`, the gradient of `-cos` is `-(T/|T| - cos B/|B|)`; the result is
    rescaled to `|B|`. 'columns': the same for every column on its own, each keeping its norm.
    With `track_scale`, the new direction `U` (the whole matrix, or each column) gets the norm
    `<U, T>` instead, the target's length along it (kept as it was where that is not positive),
    so that B carries the Jacobian's scale as well as its direction.
    """
    dim = None if alignment == "frobenius" else 0
    keep = dim is not None
    norm = matrix.norm(dim=dim, keepdim=keep).clamp_min(EPS)
    unit = matrix / norm
    unit_target = target / target.norm(dim=dim, keepdim=keep).clamp_min(EPS)
    cos = (unit * unit_target).sum(dim=dim, keepdim=keep)
    stepped = unit + lr * (unit_target - cos * unit)
    stepped = stepped / stepped.norm(dim=dim, keepdim=keep).clamp_min(EPS)
    if track_scale:
        along = (stepped * target).sum(dim=dim, keepdim=keep)
        norm = torch.where(along > EPS, along, norm)
    return stepped * norm


def estimate_batch(inputs: dict, stride: int) -> dict | None:
    """Rows 0, stride, 2 stride, ... of the batch `inputs` (key -> tensor or other; every tensor whose first
    dimension is the batch's is cut, the rest kept), which carry the estimate in a forward of their own
    (`grape_estimate_stride`); None where the training forward carries it: at stride 1, or where the batch has one
    row. Strided, not the first rows: processes holding consecutive slices of a global batch divisible by the
    stride pick together the rows one process of the whole batch picks."""
    rows = next((value.shape[0] for value in inputs.values() if isinstance(value, torch.Tensor) and value.dim()), 0)
    if stride == 1 or rows <= 1:  # also a batch without tensors, which the training forward estimates on as ever
        return None
    return {key: value[::stride] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows
            else value for key, value in inputs.items()}


class GrAPE(DFA):
    """DFA plus the alignment of every `B_k` to its smoothed Jacobian estimate.

    Attributes:
        targets: the smoothed estimates of `J_k^T` by point, (point_features, error_features).
        lr, smoothing, decay, track_scale: `grape_lr`, `grape_smoothing`, `grape_ema_decay`,
            `grape_track_scale`.
    """

    name = "grape"

    def __init__(self, model, args, placement=None):
        super().__init__(model, args, placement)
        args = self.args  # resolved: grape_lr, grape_smoothing and grape_track_scale may have been unset
        self.lr = args.grape_lr
        self.smoothing = args.grape_smoothing
        self.decay = args.grape_ema_decay
        self.track_scale = args.grape_track_scale
        self.residual = args.grape_estimator == "residual"
        self.stride = args.grape_estimate_stride
        self.targets: dict[str, torch.Tensor] = {}
        self.skipped_updates = 0  # updates skipped as non-finite since the last log line (`pop_logs`)
        self._before_update = None  # (matrices, targets, estimates_seen) before this step's update: `end_step`

    def estimate_every(self, args) -> int:
        """GrAPE estimates every `grape_update_steps` steps."""
        return args.grape_update_steps

    def measure_alignment(self, forward) -> None:
        """Nothing: GrAPE logs cos(B_k, T_k) of the estimates it trains with, and its perturbation generator is
        training state, which a measurement must not draw from."""

    def forward(self, forward, inputs, step, first_micro_batch):
        """On the first micro-batch of each optimizer step (so every micro-batch of a
        gradient-accumulation step uses the same matrices): the forward (estimating when due), then
        the update of the matrices, before the caller's backward."""
        if not first_micro_batch:
            return forward(inputs)
        estimating = step % self.estimate_steps == 0
        part = estimate_batch(inputs, self.stride) if estimating else None
        if part is not None:  # the estimate on every stride-th row, in a forward of its own: no graph, no trace left
            with leaving_no_trace(self.model), torch.no_grad(), \
                    self.estimator.estimating(self.model, stop_at_tap=True) as estimate:
                try:
                    forward(part)
                except TapReached:  # the head and the loss would only cost time: the tangent is kept
                    pass
            result = forward(inputs)
        else:
            with self.estimator.estimating(self.model) if estimating else contextlib.nullcontext() as estimate:
                result = forward(inputs)
        # Every update replaces tensors, never writes into them: keeping references is a full snapshot.
        self._before_update = (dict(self.matrices.tensors), dict(self.targets), self.estimator.estimates_seen)
        estimates = {}
        if estimating:
            estimates = self.estimator.targets(estimate, self.baselines() if self.residual else None)
        if self.update(estimates) and estimates:
            self.log_alignment(estimates)
        return result

    def baselines(self) -> dict[str, torch.Tensor]:
        """The residual estimator's guesses of `J_k^T` (`grape_estimator='residual'`), from before this step's
        estimate: each `B_k` (each column, with 'columns') scaled to its smoothed target's length along it, never
        below 0 (with `grape_track_scale` that is B_k itself; a fixed-norm B_k's own norm would be a guess of the
        wrong size, whose misfit adds noise). No guess (0) for a point without a target yet (the first estimate)."""
        dim = None if self.alignment == "frobenius" else 0
        keep = dim is not None
        guesses = {}
        for name, target in self.targets.items():
            matrix = self.matrices.tensors[name]
            target = target.to(matrix.device)
            along = (matrix * target).sum(dim=dim, keepdim=keep)
            guesses[name] = matrix * (along / matrix.pow(2).sum(dim=dim, keepdim=keep).clamp_min(EPS)).clamp_min(0)
        return guesses

    def update(self, estimates: dict[str, torch.Tensor]) -> bool:
        """Smooth `estimates` (point -> (point_features, error_features)) into `targets` and take one
        alignment step of every matrix towards its target. With no estimates, step towards the
        smoothed targets.

        Returns whether the update was made. When an estimate, a smoothed target or a stepped matrix
        is not finite, nothing changes (the matrices, the targets and the estimate count stay as
        they were; the generator moves on), the skip is counted for `pop_logs` and warned about.
        """
        matrices = self.matrices.tensors
        targets, stepped = dict(self.targets), {}
        for name, estimate in estimates.items():
            previous = targets.get(name)
            previous = previous if previous is None else previous.to(estimate.device)
            if previous is None or self.smoothing == "none":
                targets[name] = estimate
            elif self.smoothing == "cma":
                targets[name] = previous + (estimate - previous) / self.estimator.estimates_seen
            else:
                targets[name] = self.decay * previous + (1 - self.decay) * estimate
        for name, target in targets.items():
            target = targets[name] = target.to(matrices[name].device)  # loaded from a checkpoint on CPU
            stepped[name] = align_step(matrices[name], target, self.lr, self.alignment, self.track_scale)
        # One check of everything (one device sync): a NaN or inf anywhere skips the whole update.
        finite = [torch.isfinite(t).all() for t in (*estimates.values(), *targets.values(), *stepped.values())]
        bad = []
        if finite and not torch.stack(finite).all():
            bad = [name for name, estimate in estimates.items() if nonfinite_problem(estimate)]
            what = "the Jacobian estimate" if bad else "the update"
            bad = bad or [name for name in targets
                          if nonfinite_problem(targets[name]) or nonfinite_problem(stepped[name])]
        if bad:
            if estimates:
                self.estimator.estimates_seen -= 1  # the skipped estimate is not averaged in ('cma' counts them)
            self.skipped_updates += 1
            logger.warning(
                "GrAPE skipped this step's feedback update: %s of the points %s is not finite (NaN or inf: a bad "
                "batch, or an overflow of float32). The matrices and smoothed targets stay as they were and training "
                "goes on; if it repeats, check the data, or lower grape_lr and the learning rate.", what, bad)
            return False
        self.targets = targets
        matrices.update(stepped)
        return True

    def pop_logs(self) -> dict[str, float]:
        """DFA's `alignment/*` and, when updates were skipped since the last log line, how many
        (`grape/skipped_updates`)."""
        logs = super().pop_logs()
        if self.skipped_updates:
            logs["grape/skipped_updates"] = float(self.skipped_updates)
            self.skipped_updates = 0
        return logs

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

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str | None = None) -> None:
        """`Rule.load_state_dict`; once GrAPE estimated, every point's matrix must be in `state`: the
        matrices were aligned, and re-drawing one from the seed would silently undo that."""
        seen = state.get(ALIGNER + "estimates_seen")
        if isinstance(seen, torch.Tensor) and seen.numel() == 1 and int(seen) > 0:
            missing = [f"matrices.{name}" for name in self.point_names if f"matrices.{name}" not in state]
            if missing:
                raise ValueError(
                    f"{source or 'the feedback state'} lacks the feedback matrices {missing} although GrAPE aligned "
                    f"them over {int(seen)} estimates: re-drawing them from the seed would lose that. Resume from an "
                    "intact checkpoint of this run, or start a fresh run.")
        super().load_state_dict(state, source)

    def load_aligner_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore `aligner.targets.<point>` and the estimator's entries (prefix removed). GrAPE needs
        them to continue the run: refuses (naming the entry and `where`, restoring nothing) a state
        without `aligner.estimates_seen`, a target that is not a finite float32 matrix or of no
        point, and, after an estimate, a missing target or generator."""
        targets = {key.removeprefix("targets."): value for key, value in state.items()
                   if key.startswith("targets.")}
        rest = {k: v for k, v in state.items() if not k.startswith("targets.")}
        fix = "Resume from an intact checkpoint of this run, or start a fresh run."
        if "estimates_seen" not in rest:
            raise ValueError(f"{where} has no '{ALIGNER}estimates_seen' entry, which GrAPE always writes: it was not "
                             f"written by rule 'grape', or lost its aligner state. {fix}")
        unknown = sorted(set(targets) - set(self.point_names))
        if unknown:
            raise ValueError(f"{where} holds targets for {unknown}, which are not feedback points on this model (its "
                             f"points: {list(self.point_names)}). {fix}")
        for name, target in targets.items():  # float32 matrices like the estimates (all zeros is possible)
            if target.dtype != torch.float32 or target.dim() != 2:
                problem = f"is a {target.dtype} tensor of shape {tuple(target.shape)}, not a float32 matrix"
            else:
                problem = nonfinite_problem(target)
            if problem is not None:
                raise ValueError(f"'{ALIGNER}targets.{name}' in {where} {problem}. {fix}")
        seen = rest["estimates_seen"]
        if isinstance(seen, torch.Tensor) and seen.numel() == 1 and int(seen) > 0:
            missing = [f"{ALIGNER}targets.{name}" for name in self.point_names if name not in targets]
            if missing:
                raise ValueError(f"{where} lacks the smoothed targets {missing} although GrAPE made {int(seen)} "
                                 f"estimates: resetting them would diverge from the uninterrupted run. {fix}")
        super().load_aligner_state(rest, where)  # checks the estimator's entries before restoring them
        self.targets = targets
        self._before_update = None
