"""The locality audit: proof that no gradient crosses a feedback point.

One forward pass on a batch (as the rule trains: `Rule.as_trained`), then one backward per source
(each point, and the tap's own error `e`) from the tap's output, with the tap letting only that
source's signal through (`Rule.isolating`). `grape_hf.audit_locality(model, batch, args)` installs
the rule of `args`, audits it and removes it again. A parameter that receives gradient from two
sources has a gradient path across a point: a leak. A parameter shared by several modules (GPT-2
ties its input embedding to the output head) may receive one signal per module that holds it, and
the input norm of parallel branches (`Placement.shared`: Phi, GPT-J, Falcon) one signal from all the
points it feeds together. Parameters above the tap (the head) are trained by true BP from the loss
and are not part of the audit's backward. Frozen parameters (a base model under PEFT adapters) are not
audited: only trainable ones can leak or be left untrained, and points whose segments hold none are cuts
(`Placement.frozen`), which the report lists.
"""

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..fsdp import is_fully_sharded
from ..rule import Rule
from .probe import leaving_no_trace

logger = logging.getLogger(__name__)


class LocalityError(AssertionError):
    """A gradient crossed a feedback point; the message names the leaking parameters."""


@dataclass
class LocalityReport:
    """What each source reached.

    Attributes:
        receivers: source (a point name or 'error tap') -> names of the parameters it gave gradient.
        leaks: parameter name -> the sources it received from, for parameters reached by more sources
            than the modules that hold them (the points a shared input norm feeds count as one source).
        idle_points: points whose own module received nothing from them.
        unreached: trainable parameters no source reached: the head above the tap (trained by true BP from
            the loss, outside this backward), cut-off ones, and those whose gradient is exactly zero on this
            batch (LoRA's A while its B is still zero).
        frozen: the points cut for their frozen segments (`Placement.frozen`): no source of their own.
    """

    receivers: dict[str, list[str]]
    leaks: dict[str, list[str]] = field(default_factory=dict)
    idle_points: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.idle_points

    def describe(self) -> str:
        lines = [f"{source}: {len(names)} parameters" for source, names in self.receivers.items()]
        lines += [f"LEAK {param} receives gradient from {', '.join(sources)}" for param, sources in self.leaks.items()]
        lines += [f"IDLE point {p}: its own module receives none of its feedback" for p in self.idle_points]
        lines += [f"cut point {p}: its segment holds no trainable parameter (no feedback)" for p in self.frozen]
        return "\n".join(lines)


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id -> every name under which the model holds it (several for tied weights)."""
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    return holders


def _shared_points(model: nn.Module, rule: Rule) -> dict[int, set[str]]:
    """Parameter id -> the points whose feedback may all reach it (`Placement.shared`: the input norm of
    parallel branches); empty for a rule without a placement."""
    placement = getattr(rule, "placement", None)
    together: dict[int, set[str]] = {}
    for module, points in getattr(placement, "shared", ()):
        for p in model.get_submodule(module).parameters():
            together.setdefault(id(p), set()).update(points)
    return together


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module of `model` with its training flag (a user may keep some in eval mode: a frozen BatchNorm)."""
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def audit_network(model: nn.Module, rule: Rule, batch: dict, raise_on_leak: bool = True) -> LocalityReport:
    """Audit `rule` installed on `model` with one batch of model inputs.

    Args:
        batch: keyword inputs of `model` (tensors on the model's device), e.g. input_ids (B, T).
        raise_on_leak: raise `LocalityError` naming the leaking parameters (default) or only report.
    """
    sources = rule.audit_sources()  # refuses rules without feedback points (FA, PEPITA), with the reason
    params = [p for p in model.parameters() if p.requires_grad]
    holders = _holders(model)
    captured = []
    head = model.get_submodule(rule.head)
    # The tap's output: the head's input (pre-hook) or its output (hook); registered after the
    # rule's own hooks, so it sees the tap's output.
    if rule.error_point == "head_input":
        handle = head.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    else:
        handle = head.register_forward_hook(lambda m, args, out: captured.append(out[0] if isinstance(out, tuple)
                                                                                  else out))
    modes = _modes(model)
    model.eval()  # dropout off: the same graph for every source
    try:  # the model's random state and buffers as they were: training goes on exactly as without the audit
        with leaving_no_trace(model), torch.enable_grad(), rule.as_trained():
            model(**batch)
    finally:
        handle.remove()
        _restore_modes(modes)
    if not captured:
        raise RuntimeError(f"The forward pass never reached the error tap at {rule.tap_name}.")
    z = captured[-1]
    error = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z)

    receivers: dict[str, list[str]] = {}
    received_from: dict[int, list[str]] = {}
    for source in sources:
        with rule.isolating(source):
            grads = torch.autograd.grad(z, params, error, retain_graph=True, allow_unused=True)
        reached = [p for p, g in zip(params, grads) if g is not None and bool(g.ne(0).any())]
        receivers[source] = [holders[id(p)][0] for p in reached]
        for p in reached:
            received_from.setdefault(id(p), []).append(source)

    report = LocalityReport(receivers=receivers, frozen=list(getattr(rule.placement, "frozen", ())))
    together = _shared_points(model, rule)
    for p in params:
        sources = received_from.get(id(p), [])
        # The points that share this parameter's input norm give one signal between them.
        distinct = [s for s in sources if s not in together.get(id(p), ())] + sorted(
            set(sources) & together.get(id(p), set()))[:1]
        if len(distinct) > len(holders[id(p)]):
            report.leaks[holders[id(p)][0]] = sources
        if not sources:
            report.unreached.append(holders[id(p)][0])
    for point in rule.placement.points:
        own = {id(p) for p in model.get_submodule(point).parameters() if p.requires_grad}
        if own and not own.intersection(id(p) for p in params if point in received_from.get(id(p), [])):
            report.idle_points.append(point)
    if raise_on_leak and not report.ok:
        raise LocalityError("Locality audit failed:\n" + report.describe())
    return report


class UnreachedParametersError(RuntimeError):
    """A training step left trainable parameters without any gradient; the message names them."""


def unused_by_forward(model: nn.Module, rule: Rule, inputs: dict, names: list[str]) -> list[str]:
    """Those of the parameters `names` that a plain BP forward and backward on `inputs` leaves without gradient:
    the model's own forward does not use them (DINOv2's `mask_token` without `bool_masked_pos`).

    Under FSDP2 the forward computes with each unit's gathered parameters, never with the sharded ones
    `named_parameters` holds: the gathered ones are taken as each unit's forward starts (after FSDP2's pre-hook),
    and a parameter whose unit never ran is unused."""
    params = dict(model.named_parameters())
    handles, sharded = [], set()
    if is_fully_sharded(model):
        from torch.distributed.tensor import DTensor

        sharded = {name for name, p in params.items() if isinstance(p, DTensor)}

        def gathered(unit_name: str):
            def record(unit, args):
                for name, p in unit.named_parameters(prefix=unit_name):
                    if name in sharded and not isinstance(p, DTensor):  # a unit inside this one: still sharded
                        params[name] = p
                        sharded.discard(name)
            return record
        handles = [module.register_forward_pre_hook(gathered(name)) for name, module in model.named_modules()
                   if is_fully_sharded(module)]
    modes = _modes(model)
    model.eval()  # no batch-norm statistics move for this check
    try:
        with leaving_no_trace(model), torch.enable_grad(), rule.bp_step():
            outputs = model(**inputs)
    finally:
        _restore_modes(modes)
        for handle in handles:
            handle.remove()
    if isinstance(outputs, dict):
        loss = outputs["loss"] if outputs.get("loss") is not None else next(iter(outputs.values())).float().sum()
    else:
        loss = outputs[0].float().sum()
    in_graph = [name for name in names if name not in sharded]  # a unit that never ran: its parameters unused
    grads = torch.autograd.grad(loss, [params[name] for name in in_graph], allow_unused=True) if in_graph else []
    reached = {name for name, grad in zip(in_graph, grads) if grad is not None}
    return [name for name in names if name not in reached]


def check_reached(model: nn.Module, rule: Rule, inputs: dict | None = None) -> None:
    """After a training step's backward: raise `UnreachedParametersError` naming every trainable parameter
    of `model` that received no gradient, so a placement never leaves part of the model silently
    untrained (a point list that skips a module, an error tap inside the model, a cut-off embedding).
    With `inputs` (the step's model inputs), parameters that plain BP leaves without gradient on them too
    are only logged: the model's forward does not use them, whatever the rule."""
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing and inputs is not None:
        unused = unused_by_forward(model, rule, inputs, missing)
        if unused:
            logger.info("Parameters the model's forward does not use, so no rule trains them (backpropagation "
                        "neither): %s", ", ".join(unused))
        missing = [name for name in missing if name not in unused]
    if missing:
        frozen = getattr(getattr(rule, "placement", None), "frozen", ())
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise UnreachedParametersError(
            f"rule={rule.name!r} gave {len(missing)} trainable parameters no gradient in the first training step: "
            f"{shown}. With this placement (points {list(rule.point_names)}, error tap {rule.tap_name}"
            + (f"; cut for their frozen segments: {list(frozen)}" if frozen else "") + ") nothing "
            "reaches them, so they would never train. Include them (a feedback point on their module, "
            "feedback_embeddings=True, or a head_module above them), or freeze them (`requires_grad_(False)`)."
        )
