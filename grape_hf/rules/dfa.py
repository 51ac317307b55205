"""DFA (Nøkland 2016): every feedback point receives `B_k e`, with `B_k` fixed and random.

`DFA` is also the base of the other direct rules: GrAPE (`grape.py`) aligns its matrices, DRTP
(`drtp.py`) projects the one-hot target instead of the error. It installs the mechanism of
`grape_hf.direct` (placement, matrices, the feedback network) and adds nothing to the training
forward. With `alignment_probe_steps`, the probe runs a measuring-only Jacobian estimate on a forward of
its own every that many steps (`measure_alignment`), whose cos(B_k, T_k) is logged as GrAPE logs it (the
matrices never change).
"""

import contextlib
import logging

import torch

from ..direct.estimate import JacobianEstimator, cosine
from ..direct.network import TAP, FeedbackNetwork
from ..direct.placement import Placement, resolve_placement
from ..rule import Rule
from ..running_means import RunningMeans

ALIGNER = "aligner."  # prefix of the estimator's (and GrAPE's) entries in the saved state
PROBE_STATE = ("estimates_seen", "generator")  # the estimator's entries (after ALIGNER)

logger = logging.getLogger(__name__)


class DFA(Rule):
    """Points, cuts and the error tap of `args.setting` (or `feedback_modules`) on `model`.

    Args:
        model: as `Rule`.
        args: as `Rule`.
        placement: where the feedback goes (default: resolved from `args`; tests pass broken ones).

    Attributes:
        placement: the points, cuts and head.
        network: the installed `FeedbackNetwork`.
        estimator: the `JacobianEstimator` of the estimating forwards, or None (DFA without the probe). DFA's
            and DRTP's only measure (`measure_alignment`); GrAPE's trains.
        estimate_steps: estimate every this many optimizer steps (0: never).
    """

    name = "dfa"

    def __init__(self, model, args, placement: Placement | None = None):
        # Resolved first: a placement that raises must not leave the model claimed.
        placement = placement if placement is not None else resolve_placement(model, args)
        super().__init__(model, args)
        self.placement = placement
        self.point_names = self.placement.point_names
        self.head = self.placement.head
        self.error_point = self.placement.error_point
        self.network = FeedbackNetwork(model, self.placement, self.matrices, self.hook, self.signal_for_forward,
                                       args.parallel_backward)
        self.alignment = args.grape_alignment
        self.estimate_steps = self.estimate_every(args)
        self.estimator = JacobianEstimator(self.network, args.feedback_seed) if self.estimate_steps else None
        self.cosines = RunningMeans("alignment")  # cos(B_k, T_k) of each estimate, since the last log

    signal_for_forward = None  # DFA projects the error itself (DRTP: the target)

    def estimate_every(self, args) -> int:
        """DFA estimates only for the probe: every `alignment_probe_steps` steps (0: never)."""
        return args.alignment_probe_steps

    def remove(self) -> None:
        super().remove()
        self.network.close()

    def measure_alignment(self, forward) -> None:
        """The alignment probe's measuring-only Jacobian estimate: one estimating forward of `forward()` (the
        probed batch's loss) perturbed by `estimator`, whose cos(B_k, T_k) goes to the next log line (`pop_logs`).

        A forward of its own, not the training forward: the estimating forward's primal is not bitwise the plain
        forward's (attention on forward-AD kernels while estimating: logits differ by ~1e-7), and a run must train
        the same whether it is watched or not. The probe runs it with the random state forked and the model's
        buffers restored (`diagnostics.probe.leaving_no_trace`); there is no backward."""
        if self.estimator is None:
            raise RuntimeError(f"rule {self.name!r} was built with alignment_probe_steps=0, so it has no estimator "
                               "for the alignment probe: build the trainer with alignment_probe_steps set.")
        with self.estimator.estimating(self.model) as estimate:
            forward()
        self.log_alignment(self.estimator.targets(estimate))

    def checked(self, forward):
        """`forward`, raising when its feedback points did not all reach the error tap after them: then
        their segments would not train (e.g. a loss computed from the hidden states with the head's
        weight, never calling the head, or a head placed before the points). With `parallel_backward`, the
        segments' backwards of this forward run on threads (`FeedbackNetwork.segments_in_parallel`)."""
        def run(inputs):
            taps = self.network.taps
            with self.network.segments_in_parallel():
                result = forward(inputs)
            pending = self.network.pending()
            if self.network.taps == taps or pending:
                self.network.clear()
                raise RuntimeError(
                    f"This training forward did not reach the error tap at {self.tap_name} after its feedback points"
                    + (f" (points left without feedback: {pending})" if pending else "")
                    + f", so rule {self.name!r} would not train what lies below the head. The loss must come from the "
                    f"model's own call of its head module {self.head!r}, after the points (a fused head-and-loss "
                    "kernel, or a custom loss on the hidden states, bypasses it): turn the fused loss off, or name "
                    "the module that does run last with head_module."
                )
            return result
        return run

    def block_parameters(self) -> set[int]:
        """ids of the blocks' and points' parameters, less those the head or the input embeddings hold
        (GPT-2 ties its embedding to the head: it trains with the head)."""
        model = self.model
        full_rate = {id(p) for p in model.get_submodule(self.head).parameters()}
        try:
            embeddings = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):  # transformers raises for a model without one (an MLP, a CNN)
            embeddings = None
        if isinstance(embeddings, torch.nn.Module):
            full_rate.update(id(p) for p in embeddings.parameters())
        return {id(p) for name in (*self.placement.cuts, *self.placement.points)
                for p in model.get_submodule(name).parameters()} - full_rate

    def log_alignment(self, estimates: dict[str, torch.Tensor]) -> None:
        """Add cos(B_k, T_k) of this step's estimates to the next log line."""
        matrices = self.matrices.tensors
        self.cosines.add({name: float(cosine(matrices[name], t, self.alignment)) for name, t in estimates.items()})

    def pop_logs(self) -> dict[str, float]:
        return self.cosines.pop()

    # Modes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bp_step(self):
        with super().bp_step(), self.network.bypassed():
            yield

    def observing(self):
        return self.network.observing()

    def audit_sources(self) -> tuple[str, ...]:
        return (*self.point_names, TAP)

    def isolating(self, source: str):
        return self.network.isolating(source)

    # State --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        """With an estimator, `aligner.estimates_seen` and `aligner.generator` (see `JacobianEstimator`)."""
        if self.estimator is None:
            return {}
        return {ALIGNER + key: value for key, value in self.estimator.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore the `aligner.*` entries (`load_aligner_state`). DFA's aligner is only the alignment
        probe, which measures and changes no weight: a run without the probe ignores a probe's state
        (with an info line) instead of refusing the checkpoint."""
        aligner = {key.removeprefix(ALIGNER): value for key, value in state.items() if key.startswith(ALIGNER)}
        unknown = sorted(key for key in state if not key.startswith(ALIGNER))
        if unknown:
            raise ValueError(f"Unknown feedback state entries {unknown} in {where}: expected 'matrices.<point>' or "
                             "'aligner.<key>'.")
        if aligner and self.estimator is None:
            others = sorted(ALIGNER + key for key in set(aligner) - set(PROBE_STATE))
            if others:
                raise ValueError(f"{where} holds aligner state {others} that rule {self.name!r}'s alignment probe "
                                 "does not write (GrAPE's?): resume with the checkpoint's rule.")
            logger.info("%s holds the alignment probe's state but this run has no probe (alignment_probe_steps=0): "
                        "ignoring it, as the probe only measures.", where)
            return
        self.load_aligner_state(aligner, where)

    def load_aligner_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore the `aligner.*` entries (prefix removed): the estimator's (`JacobianEstimator.load_state_dict`
        checks them). A checkpoint written without the probe, resumed with it, starts a fresh probe."""
        if self.estimator is None:
            return
        unknown = sorted(ALIGNER + key for key in set(state) - set(PROBE_STATE))
        if unknown:
            raise ValueError(f"Unknown aligner state {unknown} in {where}.")
        if not state:
            logger.info("%s holds no alignment probe state (written without alignment_probe_steps): the probe "
                        "starts with a freshly seeded perturbation generator.", where)
        self.estimator.load_state_dict(state, where, ALIGNER)
