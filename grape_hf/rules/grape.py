"""GrAPE: DFA whose feedback matrices are aligned, step by step, to forward-mode Jacobian estimates.

Estimate (Algorithm 1 of the paper, rank-1 form of the revision): in the training forward itself,
under `forward_ad.dual_level()`, every point k adds a fresh `u_k ~ N(0, I)` to the forward tangent
(`FeedbackNetwork.estimating`). The tangent reaching the tap is `d = sum_k J_k u_k`, and
`T_k = mean over batch dims of outer(u_k, d)` is an unbiased estimate of `J_k^T`: its expectation
is the mean over positions n of `(dz_n / dh_k,n)^T`, every cross term (other points, other
positions through attention) vanishing. No backward pass is involved.

Update, between that forward and the backward, so the backward projects through the refined
matrices: one SGD step on `1 - cos(B_k, T_k)`, then renormalisation. The step is taken on the
unit-norm matrix ('frobenius') or on unit columns ('columns'), so `feedback_lr` means the same
rotation whatever the matrix size.
"""

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from accelerate import PartialState
from accelerate.utils import reduce

from ..feedback import point_seed
from ..forward_ad import estimating_kernels
from ..metrics import RunningMeans
from ..points import FeedbackNetwork, install

EPS = 1e-12


def jacobian_estimate(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """`T = mean over batch dims of outer(u, d)`, an estimate of `J^T`.

    Args:
        u: (*lead, *point_features), the point's perturbation.
        d: (*lead, error_features), the tangent at the tap.
    Returns:
        (prod(point_features), error_features), float32.
    """
    d_flat = d.reshape(-1, d.shape[-1]).float()
    u_flat = u.reshape(d_flat.shape[0], -1).float()
    return u_flat.T @ d_flat / d_flat.shape[0]


def cosine(matrix: torch.Tensor, target: torch.Tensor, alignment: str) -> torch.Tensor:
    """cos(B, T): of the whole matrices ('frobenius') or the mean of per-column cosines ('columns')."""
    if alignment == "frobenius":
        return (matrix * target).sum() / (matrix.norm() * target.norm()).clamp_min(EPS)
    per_column = (matrix * target).sum(0) / (matrix.norm(dim=0) * target.norm(dim=0)).clamp_min(EPS)
    return per_column.mean()


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


def _failing_module(error: BaseException, model) -> str:
    """'name (Class)' of the innermost module of `model` on the error's traceback."""
    names = {id(module): name for name, module in model.named_modules()}
    found = f"the model ({type(model).__name__})"
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if id(module) in names and names[id(module)]:
            found = f"{names[id(module)]} ({type(module).__name__})"
        tb = tb.tb_next
    return found


@contextlib.contextmanager
def estimating_forward(network: FeedbackNetwork, model):
    """Run the forward inside with dual tensors: points perturb tangents (drawn from
    `network.generator`, the global RNG if None), the tap keeps `network.tangent`."""
    with fwAD.dual_level(), estimating_kernels(model):
        network.estimating = True
        try:
            yield
        except (RuntimeError, NotImplementedError) as error:
            if "forward AD" not in str(error) and "jvp" not in str(error):
                raise
            raise RuntimeError(
                f"GrAPE's forward-mode Jacobian estimate needs forward AD through every op of "
                f"{type(model).__name__}, and one in {_failing_module(error, model)} has none: "
                f"{str(error).splitlines()[0]} Use rule='dfa', or replace that op (attention is already switched "
                "to kernels with forward AD)."
            ) from error
        finally:
            network.estimating = False


class GrapeAligner:
    """GrAPE's state and step: the perturbation generator, smoothed targets and the update.

    With `learn=False` (DFA with `alignment_probe_steps`) it only measures: it estimates every
    `alignment_probe_steps` steps and logs cos(B_k, T_k), never touching B_k, so the two rules
    log the same figure.

    Args:
        network: the installed `FeedbackNetwork` whose matrices are aligned.
        args: `GrapeTrainingArguments` (feedback_lr, feedback_alignment, feedback_smoothing,
            feedback_ema_decay, feedback_update_steps, feedback_seed, alignment_probe_steps).
        learn: update the matrices (GrAPE) or only measure (DFA).
    """

    def __init__(self, network: FeedbackNetwork, args, learn: bool = True):
        self.network = network
        self.learn = learn
        self.lr = args.feedback_lr
        self.alignment = args.feedback_alignment
        self.smoothing = args.feedback_smoothing
        self.decay = args.feedback_ema_decay
        self.estimate_steps = args.feedback_update_steps if learn else args.alignment_probe_steps
        self.seed = point_seed(args.feedback_seed, "perturbations")
        self.targets: dict[str, torch.Tensor] = {}  # smoothed estimates of J_k^T
        self.estimates_seen = 0  # for the cumulative moving average
        self.cosines = RunningMeans("alignment")  # cos(B_k, T_k) of this step's estimates, since the last log
        self._generator_state: torch.Tensor | None = None  # from a checkpoint, applied when the generator is made
        self._before_update = None  # (matrices, targets, estimates_seen) before this step's update: `end_step`

    @contextlib.contextmanager
    def aligned_forward(self, model, step: int):
        """Wrap one training forward of optimizer step `step`: estimate when it is due (every
        `estimate_steps`), then update the matrices, before the caller's backward."""
        if step % self.estimate_steps != 0:
            yield
            if self.learn:
                self.update({})
            return
        network = self.network
        self._prepare_generator(model.device)
        with estimating_forward(network, model):
            yield
        if network.tangent is None:
            raise RuntimeError(f"The forward pass never reached the error tap at {network.tap_name}.")
        estimates = {name: reduce(jacobian_estimate(u, network.tangent), reduction="mean")  # same on all processes
                     for name, u in network.perturbations.items()}
        network.perturbations.clear()
        network.tangent = None
        if self.learn:
            self.update(estimates)
        matrices = network.matrices.tensors
        self.cosines.add({name: float(cosine(matrices[name], t, self.alignment)) for name, t in estimates.items()})

    def update(self, estimates: dict[str, torch.Tensor]) -> None:
        """Smooth `estimates` into `targets` and take one alignment step of every matrix towards
        its target. With no estimates, step towards the smoothed targets."""
        matrices = self.network.matrices.tensors
        # Every step below replaces tensors, never writes into them: keeping references is a full snapshot.
        self._before_update = (dict(matrices), dict(self.targets), self.estimates_seen)
        if estimates:
            self.estimates_seen += 1
        for name, estimate in estimates.items():
            previous = self.targets.get(name)
            previous = previous if previous is None else previous.to(estimate.device)
            if previous is None or self.smoothing == "none":
                self.targets[name] = estimate
            elif self.smoothing == "cma":
                self.targets[name] = previous + (estimate - previous) / self.estimates_seen
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
            self.network.matrices.tensors = dict(matrices)
            self.targets = dict(targets)
            self.estimates_seen = estimates_seen
        self._before_update = None

    def _prepare_generator(self, device: torch.device) -> None:
        """Give the network its perturbation generator on `device` (seeded, or in a checkpoint's
        state) and this process's slice of the global batch (`FeedbackNetwork.shard`)."""
        network = self.network
        state = PartialState()
        network.shard = (state.process_index, state.num_processes)
        if network.generator is not None and network.generator.device == device:
            return
        saved, self._generator_state = self._generator_state, None
        network.generator = torch.Generator(device=device).manual_seed(self.seed)
        if saved is not None:
            try:
                network.generator.set_state(saved)
            except RuntimeError as error:
                raise RuntimeError(
                    f"The saved perturbation generator state ({saved.numel()} bytes) does not fit a generator on "
                    f"{device} ({error}): GrAPE resumes exactly only on the device type it was saved on. Resume "
                    "on that device type, or start a fresh run."
                ) from error

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`targets.<point>` (smoothed estimates, (point_features, error_features)), `estimates_seen`
        (a 0-d int64) and, once an estimate was drawn, `generator` (the perturbation generator's
        uint8 state)."""
        state = {f"targets.{name}": target for name, target in self.targets.items()}
        state["estimates_seen"] = torch.tensor(self.estimates_seen, dtype=torch.int64)
        generator = self.network.generator
        if generator is not None:
            state["generator"] = generator.get_state()
        elif self._generator_state is not None:
            state["generator"] = self._generator_state
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str | None = None) -> None:
        """Restore what `state_dict` returned; the generator state is applied when the next estimate
        makes the generator on the model's device."""
        known = {"estimates_seen", "generator"}
        unknown = [key for key in state if key not in known and not key.startswith("targets.")]
        if unknown:
            raise ValueError(f"Unknown aligner state {unknown} in {source or 'the state'}.")
        self.targets = {key.removeprefix("targets."): value for key, value in state.items()
                        if key.startswith("targets.")}
        self.estimates_seen = int(state["estimates_seen"]) if "estimates_seen" in state else 0
        self._generator_state = state.get("generator")
        self.network.generator = None
        self._before_update = None


def build(model, args) -> FeedbackNetwork:
    """DFA's points, cuts and tap, plus a `GrapeAligner` as `network.aligner`."""
    network = install(model, args)
    network.aligner = GrapeAligner(network, args)
    return network
