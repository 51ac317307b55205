"""`HookedRule`: the base of the rules that hook a model's weight layers directly instead of wiring
feedback points to the error hub (FA, PEPITA). It offers what `GrapeTrainer` and the checkpoints use
of a `FeedbackNetwork`: `matrices`, `bypass`, `aligner`, `remove()`, `state_dict()`, `point_names`,
`tap_name`, `placement`, and clear errors for the locality audit and the alignment probe, which do
not apply.
"""

import weakref

import torch
from torch import nn

from ..feedback import FeedbackMatrices
from ..placement import Placement
from ..points import claim, release


def not_applicable(rule: str, what: str, why: str) -> ValueError:
    """The error for a feature that rule `rule` does not have."""
    return ValueError(f"rule={rule!r} has no {what}: {why}")


class HookedRule:
    """Hooks on `model` and the random matrices they use.

    Subclasses set `rule` (its name) and `audit_reason` (why `audit_network` refuses them), fill `point_names` (the matrices' names, in
    forward order) and `placement` (the layers the rule trains and the output layer, for model cards),
    and register their hooks with `hook`.

    Attributes:
        matrices: the rule's random matrices, by name (seeded per name, `feedback_init`).
        bypass: while True the hooks do nothing: the model runs (and backpropagates) as plain BP.
        aligner: always None (the matrices are fixed).
    """

    rule = ""
    audit_reason = ""

    def __init__(self, model: nn.Module, matrices: FeedbackMatrices):
        claim(model, self)
        self._model = weakref.ref(model)
        self.matrices = matrices
        self.bypass = False
        self.aligner = None
        self.point_names: tuple[str, ...] = ()
        self.placement: Placement | None = None
        self._handles = []

    @property
    def tap_name(self) -> str:
        """Where the error comes from: the output layer's output, e.g. 'classifier:output'."""
        return f"{self.placement.tap_module}:output"

    def hook(self, handle) -> None:
        """Keep a hook handle for `remove`."""
        self._handles.append(handle)

    def _active(self) -> bool:
        return torch.is_grad_enabled() and not self.bypass

    def remove(self) -> None:
        """Remove every hook: the model computes exactly as before the rule was installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        release(self._model(), self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`matrices.<name>`: the matrices created so far."""
        return {f"matrices.{name}": matrix for name, matrix in self.matrices.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str | None = None) -> None:
        """Restore what `state_dict` returned; `source` names the file in later errors."""
        matrices = {}
        for key, value in state.items():
            group, _, name = key.partition(".")
            if group != "matrices" or name not in self.point_names:
                raise ValueError(f"Unexpected feedback state entry {key!r} in {source or 'the state'}: rule "
                                 f"{self.rule!r} holds 'matrices.<name>' for {list(self.point_names)}.")
            matrices[name] = value
        self.matrices.load_state_dict(matrices, source)

    def true_alignment(self, forward):
        raise not_applicable(self.rule, "alignment probe", "it projects no error to feedback points; set "
                                                           "alignment_probe_steps=0.")
