"""`Rule`: what every learning rule is to `GrapeTrainer`, the checkpoints, the card and the diagnostics.

A rule is installed on a model when it is built (its hooks registered, the model claimed so that
no second rule hooks it too) and `remove()` hands the model back exactly as it was. The trainer
calls one method per training forward, `training_forward`, and knows nothing of any rule's
mathematics. The rule's state outside the model (its random matrices, GrAPE's estimates) is
`state_dict()`; nothing outside the rule writes it.

Modes are context managers, entered with `with` and always left:
- `bp_step()`: the hooks do nothing; the forward and backward are plain BP (BP calibration).
- `observing()`: the feedback points are only recorded (the true-alignment probe).
- `isolating(source)`: the error tap lets one source's signal through (the locality audit).
- `as_trained()`: the forward as this rule trains it (GrAPE: with dual tensors), for the audit.
Rules without feedback points (FA, PEPITA) refuse the last three with `not_applicable`.
"""

import contextlib
import weakref

import torch
from torch import nn

from .direct.matrices import FeedbackMatrices
from .direct.placement import tap_name
from .recommended import resolve_settings

PROBE = "alignment probe (set alignment_probe_steps=0)"
AUDIT = "feedback points to audit"

_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, Rule]" = weakref.WeakKeyDictionary()


def installed_rule(model: nn.Module) -> "Rule | None":
    """The rule whose hooks `model` carries, or None."""
    return _INSTALLED.get(model)


def not_applicable(rule: str, what: str, why: str) -> ValueError:
    """The error for a feature that rule `rule` does not have."""
    return ValueError(f"rule={rule!r} has no {what}: {why}")


class Rule:
    """The base of every rule: its hooks on one model, its random matrices, its state and its modes.

    Subclasses set `name`, fill `point_names` (the names of their matrices, in forward order),
    `head` (the output head module) and `error_point` ('head_input' or 'logits'), register their
    hooks through `hook`, and override `forward` (their training forward) and, where they hold more
    than matrices, `extra_state` / `load_extra_state`.

    Args:
        model: the model to install on (claimed: a second rule on it is refused).
        args: `GrapeTrainingArguments` (feedback_init, feedback_seed, bp_calibration_steps). Its unset recommended
            fields are resolved for `model` here (`grape_hf.recommended.resolve_settings`): subclasses read
            `self.args`, never the `args` they were given, for those fields.

    Attributes:
        args: `args` with every recommended field resolved (a copy; the given object is unchanged).
        settings: the resolved recommended fields with their origins and source (`grape_hf.recommended.Settings`).
        matrices: the rule's random matrices by name (seeded per name by `feedback_seed`).
        points_reason: None for rules with feedback points; otherwise why the audit and the probe
            do not apply (the text of their refusal).
    """

    name = ""
    points_reason: str | None = None

    def __init__(self, model: nn.Module, args):
        if model in _INSTALLED:
            raise RuntimeError(
                f"This {type(model).__name__} already carries grape_hf feedback (from another GrapeTrainer or "
                "audit); two sets of hooks would compute neither rule. Call `.feedback.remove()` on the trainer "
                "that installed it first, or build a fresh model."
            )
        self._refuse_gradient_checkpointing(model, ValueError)
        self.args, self.settings = resolve_settings(model, args)  # may raise: before the model is claimed
        args = self.args
        _INSTALLED[model] = self
        self._model = weakref.ref(model)
        self._handles = []
        self.matrices = FeedbackMatrices(args.feedback_init, args.feedback_seed)
        self.calibration_steps = args.bp_calibration_steps
        self.point_names: tuple[str, ...] = ()
        self.head = ""
        self.error_point = "logits"
        self._bypass = False

    @property
    def model(self) -> nn.Module | None:
        """The model the rule is installed on (None once it was garbage-collected)."""
        return self._model()

    @property
    def tap_name(self) -> str:
        """Where the error is read, e.g. 'lm_head:input' or 'classifier:output'."""
        return tap_name(self.head, self.error_point)

    def hook(self, handle) -> None:
        """Keep a hook handle for `remove`."""
        self._handles.append(handle)

    def remove(self) -> None:
        """Remove every hook: the model computes exactly as before the rule was installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        model = self._model()
        if model is not None and _INSTALLED.get(model) is self:
            del _INSTALLED[model]

    def _active(self) -> bool:
        """Whether hooks act on this forward: gradients on and not in `bp_step`."""
        return torch.is_grad_enabled() and not self._bypass

    # The training step --------------------------------------------------------------------
    def training_forward(self, forward, inputs: dict, step: int, first_micro_batch: bool):
        """One training forward of optimizer step `step`; `forward(inputs)` is the Trainer's loss
        computation and returns (loss, outputs). Every `bp_calibration_steps`-th step runs as true BP
        (the revision's calibration); the others are the rule's own `forward`, each forward of it
        checked (`checked`). Refuses to run when the rule can no longer act on the model."""
        model = self.model
        if not self._handles:
            raise RuntimeError(
                f"rule {self.name!r} was removed from the model (`remove()`), so this step would train by plain "
                f"backpropagation while its checkpoints and model card still say {self.name!r}. Build a new "
                "GrapeTrainer, or train with rule='bp'."
            )
        self._refuse_gradient_checkpointing(model, RuntimeError)
        if self.calibration_steps and (step + 1) % self.calibration_steps == 0:
            with self.bp_step():
                return forward(inputs)
        return self.forward(self.checked(forward), inputs, step, first_micro_batch)

    def _refuse_gradient_checkpointing(self, model: nn.Module, error: type[Exception]) -> None:
        """Raise `error` when `model` recomputes its blocks (`gradient_checkpointing_enable()`, at install or
        turned on later): the recomputation would run the rule's hooks twice."""
        # transformers 5 renamed the flag (the old name warns); look for the new one first
        name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
            "is_gradient_checkpointing"
        if getattr(model, name, False):
            raise error(
                f"Gradient checkpointing is on for this {type(model).__name__} (`gradient_checkpointing_enable()`), "
                f"which does not work with rule={self.name!r}: recomputing a block runs its feedback hooks twice. "
                "Call `model.gradient_checkpointing_disable()`."
            )

    def checked(self, forward):
        """`forward`, wrapped in the rule's check that its hooks really ran (none by default)."""
        return forward

    def forward(self, forward, inputs: dict, step: int, first_micro_batch: bool):
        """The rule's training forward (see `training_forward`): by default, the hooked model's forward."""
        return forward(inputs)

    def block_parameters(self) -> set[int]:
        """ids of the parameters only feedback reaches (their learning rate is scaled by `block_lr_scale`);
        none by default."""
        return set()

    def end_step(self, skipped: bool) -> None:
        """Called after each optimizer step; `skipped`: the optimizer skipped it (fp16 overflow)."""

    def pop_logs(self) -> dict[str, float]:
        """The rule's own figures since the last training log line (e.g. GrAPE's `alignment/*`)."""
        return {}

    # Modes --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def bp_step(self):
        """Inside, the hooks do nothing: the model runs (and backpropagates) as plain BP."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    def require_points(self, feature: str) -> None:
        """Raise `not_applicable` for `feature` (what needs them) when this rule has no feedback points."""
        if self.points_reason is not None:
            raise not_applicable(self.name, feature, self.points_reason)

    def observing(self):
        """Inside, the feedback points and the error are recorded, nothing is changed; yields the
        record (`points`: name -> tensor, `z`: the tensor at the tap, `feedback(e)`)."""
        self.require_points(PROBE)
        raise NotImplementedError

    def audit_sources(self) -> tuple[str, ...]:
        """The sources of the locality audit: every point and the tap's own error."""
        self.require_points(AUDIT)
        raise NotImplementedError

    def isolating(self, source: str):
        """Inside, the error tap's backward lets only `source`'s signal through."""
        self.require_points(AUDIT)
        raise NotImplementedError

    def as_trained(self):
        """The mode this rule's training forwards run in (for the audit): plain by default."""
        return contextlib.nullcontext()

    def measure_alignment(self, forward) -> None:
        """For the alignment probe on a probed step: the rule's own measuring-only figures from `forward()`, a
        forward of the step's batch that is not trained (DFA: cos(B_k, T_k) of a Jacobian estimate), kept for
        `pop_logs`; nothing by default. The probe runs it with the random state forked and the buffers restored."""

    # State --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rule's state outside the model: `matrices.<name>` and the rule's `extra_state`."""
        state = {f"matrices.{name}": matrix for name, matrix in self.matrices.state_dict().items()}
        state.update(self.extra_state())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str | None = None) -> None:
        """Restore what `state_dict` returned; `source` names the file in errors.

        Every entry is checked before anything is restored; a `ValueError` naming the entry and
        `source` refuses matrices of other points, matrices that are not float32, finite and nonzero
        (`FeedbackMatrices.check`) and, for rules with feedback points, a partial set of matrices
        (those rules make every point's matrix in their first forward, so a missing one would be
        silently re-drawn from the seed), then whatever the rule's `load_extra_state` refuses.
        """
        where = source or "the feedback state"
        matrices = {key.removeprefix("matrices."): value for key, value in state.items()
                    if key.startswith("matrices.")}
        unknown = set(matrices) - set(self.point_names)
        if unknown:
            raise ValueError(f"{where} holds matrices for {sorted(unknown)}, which are not feedback points of "
                             f"rule {self.name!r} on this model (its points: {list(self.point_names)}).")
        self.matrices.check(matrices, where)
        missing = [f"matrices.{name}" for name in self.point_names if name not in matrices]
        if self.points_reason is None and matrices and missing:
            raise ValueError(f"{where} lacks the feedback matrices {missing} but holds those of the other points: "
                             "resuming would draw them afresh instead of restoring them. Resume from an intact "
                             "checkpoint of this run, or start a fresh run.")
        self.load_extra_state({key: value for key, value in state.items() if not key.startswith("matrices.")}, where)
        self.matrices.load_state_dict(matrices, source)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """State beyond the matrices, keys as saved (none by default)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore `extra_state`; by default there is none, so any entry is refused."""
        if state:
            raise ValueError(f"Unexpected feedback state entries {sorted(state)} in {where}: rule {self.name!r} "
                             "holds only 'matrices.<name>'. Resume with the checkpoint's rule and options.")
