"""Forward-mode Jacobian estimates at the feedback points (GrAPE's estimate; DFA's alignment probe).

In the training forward itself, under `forward_ad.dual_level()`, every point k adds a fresh
`u_k ~ N(0, I)` to the forward tangent (`FeedbackNetwork.estimating`). The tangent reaching the
tap is `d = sum_k J_k u_k`, and `T_k = mean over batch dims of outer(u_k, d)` is an unbiased
estimate of `J_k^T`: its expectation is the mean over positions n of `(dz_n / dh_k,n)^T`, every
cross term (other points, other positions through attention) vanishing. No backward pass is involved.
For a point whose feedback is broadcast over its positions (`matrices.broadcasts`: a sequence
under a classifier's error), `u_k` is first summed over the point's real positions, so `T_k`
estimates the sum over those positions of `(dz / dh_k,n)^T`, the shape and target of its `B_k`
(`matrices.position_weights`).
"""

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from accelerate import PartialState
from accelerate.utils import reduce

from .forward_ad import estimating_kernels
from .matrices import point_seed
from .network import Estimate, FeedbackNetwork

EPS = 1e-12


def flat_perturbation(u: torch.Tensor, rows: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """A point's perturbation as (rows, features) float32 rows matching the tap's tangent rows; for a point that
    `broadcasts` (u: (*lead, positions, features)), first summed over its `real_positions` (*lead, positions)."""
    if positions is not None:
        u = (u.float() * positions.to(u.device).unsqueeze(-1)).sum(-2)
    return u.reshape(rows, -1).float()


def jacobian_estimate(u: torch.Tensor, d: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """`T = mean over batch dims of outer(u, d)`, an estimate of `J^T`.

    Args:
        u: (*lead, *point_features), the point's perturbation.
        d: (*lead, error_features), the tangent at the tap.
        positions: for a point that `broadcasts`, u being (*lead, positions, features): its
            `real_positions` (*lead, positions); u is summed over them first.
    Returns:
        (prod(point_features), error_features), or (features, error_features) with `positions`; float32.
    """
    d_flat = d.reshape(-1, d.shape[-1]).float()
    return flat_perturbation(u, d_flat.shape[0], positions).T @ d_flat / d_flat.shape[0]


def residual_estimates(perturbations: dict[str, torch.Tensor], d: torch.Tensor,
                       positions: dict[str, torch.Tensor | None],
                       baselines: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`T_k = C_k + mean over batch dims of outer(u_k, d - sum_j u_j C_j)`: `jacobian_estimate` with a guess `C_j`
    of each `J_j^T` as a control variate.

    `u_j C_j` is what the guess predicts of point j's share `J_j u_j` of the tangent. Subtracting it keeps the
    estimate unbiased whatever the guesses, as long as they do not depend on this draw (for j != k, u_j is
    independent of u_k, whose mean is zero; for j = k, E[u u^T] = I turns `- u_k C_k` into the `- C_k` that the
    added `C_k` cancels), and its noise now comes from `J_j - C_j^T`, what the guesses miss, instead of from the
    whole `J_j`: the plain estimate's noise grows with the number of points (every point's perturbation reaches
    every other point's estimate), this one shrinks as the guesses improve.

    Args:
        perturbations: point -> u_k (*lead, *point_features) (positions before the features for a point that
            broadcasts).
        d: (*lead, error_features), the tangent at the tap.
        positions: point -> its `real_positions` or None (see `jacobian_estimate`).
        baselines: point -> C_k (point_features, error_features); a point without one has the guess 0.
    Returns:
        point -> T_k (point_features, error_features), float32.
    """
    residual = d.reshape(-1, d.shape[-1]).float()
    rows = residual.shape[0]
    flat = {name: flat_perturbation(u, rows, positions.get(name)) for name, u in perturbations.items()}
    guesses = {name: baselines[name].to(residual.device, torch.float32) for name in flat if name in baselines}
    for name, guess in guesses.items():
        residual = residual - flat[name] @ guess
    estimates = {name: u.T @ residual / rows for name, u in flat.items()}
    return {name: estimate + guesses[name] if name in guesses else estimate for name, estimate in estimates.items()}


def cosine(matrix: torch.Tensor, target: torch.Tensor, alignment: str) -> torch.Tensor:
    """cos(B, T): of the whole matrices ('frobenius') or the mean of per-column cosines ('columns')."""
    if alignment == "frobenius":
        return (matrix * target).sum() / (matrix.norm() * target.norm()).clamp_min(EPS)
    per_column = (matrix * target).sum(0) / (matrix.norm(dim=0) * target.norm(dim=0)).clamp_min(EPS)
    return per_column.mean()


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
def estimating_forward(network: FeedbackNetwork, model, draw, stop_at_tap: bool = False):
    """Run the forward inside with dual tensors: each point adds `draw(name, h_k)` to its tangent;
    yields the network's `Estimate` (perturbations, and the tangent at the tap after the forward; with
    `stop_at_tap` the forward ends there, raising `network.TapReached`)."""
    with fwAD.dual_level(), estimating_kernels(model), network.estimating(draw, stop_at_tap) as estimate:
        try:
            yield estimate
        except (RuntimeError, NotImplementedError) as error:
            if "forward AD" not in str(error) and "jvp" not in str(error):
                raise
            raise RuntimeError(
                f"GrAPE's forward-mode Jacobian estimate needs forward AD through every op of "
                f"{type(model).__name__}, and one in {_failing_module(error, model)} has none: "
                f"{str(error).splitlines()[0]} Use rule='dfa', or replace that op (attention is already switched "
                "to kernels with forward AD)."
            ) from error


class JacobianEstimator:
    """Seeded perturbations and the estimates `T_k` they give, the same on every process.

    Every process draws the perturbations of the global batch and keeps its own slice, so N
    processes of batch b perturb exactly as one process of batch N*b (the price: N times the random
    numbers, one point at a time), and the estimates are averaged across processes.

    Args:
        network: the installed `FeedbackNetwork` whose points are perturbed.
        seed: the feedback seed (the generator's seed is derived from it).

    Attributes:
        estimates_seen: how many estimates `targets` returned (GrAPE's cumulative average counts them).
    """

    def __init__(self, network: FeedbackNetwork, seed: int):
        self.network = network
        self.seed = point_seed(seed, "perturbations")
        self.estimates_seen = 0
        self._generator: torch.Generator | None = None
        self._saved_state: torch.Tensor | None = None  # from a checkpoint, applied when the generator is made
        self._shard = (0, 1)  # (this process, processes)

    @contextlib.contextmanager
    def estimating(self, model, stop_at_tap: bool = False):
        """The estimating forward of `model` (see `estimating_forward`), perturbed by this estimator;
        yields the `Estimate`, to pass to `targets` afterwards."""
        self._prepare(model.device)
        with estimating_forward(self.network, model, self.draw, stop_at_tap) as estimate:
            yield estimate

    def draw(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """`u ~ N(0, I)` of `like`'s shape (batch, ...): this process's slice of the global batch's draw."""
        rank, processes = self._shard
        shape = (like.shape[0] * processes, *like.shape[1:])
        u = torch.randn(shape, generator=self._generator, device=like.device, dtype=like.dtype)
        if processes == 1:
            return u
        return u[rank * like.shape[0]:(rank + 1) * like.shape[0]].clone()  # a copy frees the rest of the draw

    def targets(self, estimate: Estimate, baselines: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`T_k` (point_features, error_features) per point of `estimate`, averaged across processes:
        `jacobian_estimate`, or with `baselines` (point -> a guess of J_k^T) `residual_estimates`."""
        if estimate.tangent is None:
            raise RuntimeError(f"The forward pass never reached the error tap at {self.network.placement.tap_name}.")
        self.estimates_seen += 1
        if baselines is not None:
            local = residual_estimates(estimate.perturbations, estimate.tangent, estimate.positions, baselines)
        else:
            local = {name: jacobian_estimate(u, estimate.tangent, estimate.positions.get(name))
                     for name, u in estimate.perturbations.items()}
        return {name: reduce(t, reduction="mean") for name, t in local.items()}  # same on all processes

    def _prepare(self, device: torch.device) -> None:
        """The generator on `device` (seeded, or in a checkpoint's state) and this process's slice."""
        state = PartialState()
        self._shard = (state.process_index, state.num_processes)
        if self._generator is not None and self._generator.device == device:
            return
        saved, self._saved_state = self._saved_state, None
        self._generator = torch.Generator(device=device).manual_seed(self.seed)
        if saved is not None:
            try:
                self._generator.set_state(saved)
            except RuntimeError as error:
                raise RuntimeError(
                    f"The saved perturbation generator state ({saved.numel()} bytes) does not fit a generator on "
                    f"{device} ({error}): GrAPE resumes exactly only on the device type it was saved on. Resume "
                    "on that device type, or start a fresh run."
                ) from error

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`estimates_seen` (a 0-d int64) and, once an estimate was drawn, `generator` (its uint8 state)."""
        state = {"estimates_seen": torch.tensor(self.estimates_seen, dtype=torch.int64)}
        generator = self._generator.get_state() if self._generator is not None else self._saved_state
        if generator is not None:
            state["generator"] = generator
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str = "the feedback state",
                        prefix: str = "") -> None:
        """Restore `state_dict`; the generator state is applied when the next estimate makes the generator.

        An empty `state` starts afresh (no estimates, the seeded generator). Otherwise it must hold an
        integer `estimates_seen` >= 0 and, once an estimate was drawn, the uint8 `generator`: a
        freshly seeded generator would repeat the first perturbations instead of continuing the run.
        Anything else raises a `ValueError` naming the entry (`prefix + key`) and `where`, and
        restores nothing.
        """
        seen, generator = state.get("estimates_seen"), state.get("generator")
        fix = "Resume from an intact checkpoint of this run, or start a fresh run."
        if state:
            if (not isinstance(seen, torch.Tensor) or seen.numel() != 1 or seen.is_floating_point()
                    or seen.is_complex() or seen.dtype == torch.bool or int(seen) < 0):
                raise ValueError(f"{where} has no valid '{prefix}estimates_seen' entry (an integer >= 0; found "
                                 f"{seen!r}), so the perturbation generator cannot be resumed. {fix}")
            if generator is None and int(seen) > 0:
                raise ValueError(
                    f"{where} has {prefix}estimates_seen={int(seen)} but no '{prefix}generator' entry: the state of "
                    "the generator that drew those perturbations is lost, and a freshly seeded one would repeat the "
                    f"first perturbations instead of continuing the run. {fix}")
            if generator is not None and (generator.dtype != torch.uint8 or generator.dim() != 1
                                          or not generator.numel()):
                raise ValueError(f"'{prefix}generator' in {where} is not a generator state (a 1-D uint8 tensor; found "
                                 f"{generator.dtype}, shape {tuple(generator.shape)}). {fix}")
        self.estimates_seen = int(seen) if seen is not None else 0
        self._saved_state = generator
        self._generator = None
