"""The direct rules' feedback network on a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`,
as accelerate's FSDP plugin version 2 applies it: each block, then the root).

FSDP2 gathers a unit's parameters in the unit's forward pre-hook and frees them in its forward hook
(`reshard_after_forward=True`); it gathers them again from a hook on the unit's output tensors when
the backward reaches them, and reduce-scatters their gradients and frees them again from an autograd
Function it applies to the unit's input tensors (`RegisterPostBackwardFunction`), once the unit's
backward has reached its inputs; a callback at the end of the backward catches the units that never
got there. The feedback network detaches exactly those tensors (the points hand the network a
detached copy of their output, the cuts detach every block input), so with the hooks as they are,
a segment's backward would run on freed parameters, and every unit's gradients would wait for the
end of the backward. `ShardedFeedback` arranges the two:

- Every point's recorded tensor gets a hook that gathers the parameters of its unit (the innermost
  FSDP2 module that holds the point) when its feedback `B_k e` arrives, before the segment's local
  backward, and starts gathering the unit of the next point down (prefetch, as FSDP2 does itself).
- A cut on a block that is an FSDP2 unit runs before FSDP2's pre-hook and hands the block its stream
  (first) input through `Stop`: the same values, no gradient to anything upstream, but requiring
  gradient, so FSDP2 applies its post-backward Function to it. The unit's gradients are then reduced
  and its parameters freed as soon as its own segments' backward is done, as under backpropagation.
  The price: the gradient at the block's input is computed (and dropped by `Stop`).
- While GrAPE estimates, the stream's forward tangent is taken off before FSDP2's Function (which has
  no working forward-AD rule for inputs that require gradient) and put back by the cut's own hook,
  which runs after FSDP2's.

Gradients are exactly those without FSDP (tests/test_fsdp.py: two processes against one).
"""

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

FSDP_RULES = ("dfa", "grape", "drtp")  # the rules tested under FSDP2 (tests/test_fsdp.py)


def fsdp_refusal(plugin, rule: str) -> str | None:
    """Why `rule` cannot train under accelerate's FSDP `plugin` (a `FullyShardedDataParallelPlugin`), or None
    when it can: FSDP version 2, a direct rule, no activation checkpointing."""
    ddp = "Use data parallelism without FSDP (accelerate launch --multi_gpu, DDP)"
    if getattr(plugin, "fsdp_version", 1) != 2:
        return (f"FSDP version 1 does not work with rule={rule!r}: it flattens each wrapped block's parameters and "
                "re-gathers them from hooks on the very tensors the rule's feedback points and cuts detach. Use FSDP "
                "version 2 (accelerate launch --use_fsdp --fsdp_version 2, or fsdp_config={'version': 2}), "
                f"which grape_hf arranges its hooks around. {ddp}, or rule='bp'.")
    if rule not in FSDP_RULES:
        return (f"FSDP does not work with rule={rule!r}: it hooks the weight layers themselves (FA's backward "
                "through its own matrices, PEPITA's second, modulated forward), which has not been tested against "
                f"FSDP's gathering and freeing of parameters (only {list(FSDP_RULES)} have). {ddp}, or one of "
                f"{list(FSDP_RULES)}.")
    if getattr(plugin, "activation_checkpointing", False):
        return (f"FSDP's activation checkpointing does not work with rule={rule!r}: recomputing a block in the "
                "backward runs its feedback hooks a second time. Turn it off (fsdp_activation_checkpointing: false, "
                "or fsdp_config={'activation_checkpointing': False}); shard more, or lower the batch, for memory.")
    return None


def fsdp2_module_class():
    """`torch.distributed.fsdp.FSDPModule`, or None where torch has no distributed package."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` (FSDP2) was applied to `module`."""
    cls = fsdp2_module_class()
    return cls is not None and isinstance(module, cls)


class Stop(torch.autograd.Function):
    """Forward: `x`'s values (sharing its storage), requiring gradient through `anchor` (a scalar leaf).
    Backward: nothing to either, so nothing upstream of a cut receives gradient."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


class ShardedFeedback:
    """A `FeedbackNetwork`'s hooks arranged around FSDP2's on `model` (see the module docstring).

    Made by the network at the first forward of a model found sharded; its hooks are registered
    through `hook` (the rule's), so `Rule.remove` removes them with the others.

    Args:
        network: the installed `grape_hf.direct.network.FeedbackNetwork`.
        model: the sharded model (an FSDP2 module: `fully_shard` was applied to its root).
        hook: keeps a hook handle (`Rule.hook`).

    Attributes:
        cuts: names of the cut blocks that are FSDP2 units (their inputs go through `Stop`).
        units: point name -> the FSDP2 unit that holds the point's module (below the root).
    """

    def __init__(self, network, model: nn.Module, hook):
        self.network = network
        placement = network.placement
        self.cuts = {name for name in placement.cuts if is_fully_sharded(model.get_submodule(name))}
        for name in self.cuts:
            # prepend: before FSDP2's pre-hook, so that FSDP2 sees the stream `Stop` hands the block
            hook(model.get_submodule(name).register_forward_pre_hook(
                self._make_early_cut(name == placement.embedding_block), prepend=True, with_kwargs=True))
        units = {name: module for name, module in model.named_modules() if name and is_fully_sharded(module)}
        self.units: dict[str, nn.Module] = {}
        for point in placement.points:
            holders = [name for name in units if point == name or point.startswith(name + ".")]
            if holders:
                self.units[point] = units[max(holders, key=len)]
        # The unit whose backward comes next (points in reverse forward order): gathered ahead.
        self._next: dict[str, nn.Module] = {}
        ordered = [point for point in placement.point_names if point in self.units]
        for later, earlier in zip(ordered[1:], ordered[:-1]):
            if self.units[earlier] is not self.units[later]:
                self._next[later] = self.units[earlier]
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._tangents: dict[int, torch.Tensor] = {}  # id(block) -> the stream's tangent, between the two hooks

    def _anchor(self, device: torch.device) -> torch.Tensor:
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def _make_early_cut(self, record_embeddings: bool):
        def early_cut(module, args, kwargs):
            network = self.network
            if not network._active():
                return None
            cut = network.cut_inputs(args, kwargs, record_embeddings)
            if cut is None:  # observing: nothing is cut
                return None
            args, kwargs = cut
            stream = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(stream, torch.Tensor) or not stream.is_floating_point():
                return args, kwargs  # no stream to hand over: the unit is reduced by FSDP2's final callback
            primal, tangent = fwAD.unpack_dual(stream)
            if tangent is not None:
                self._tangents[id(module)] = tangent
            stopped = Stop.apply(self._anchor(primal.device), primal)
            if args:
                return (stopped, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": stopped}
        return early_cut

    def restore_tangent(self, module: nn.Module, args: tuple, kwargs: dict):
        """The cut's own hook on a block of `cuts` (after FSDP2's pre-hook): the stream's forward tangent,
        taken off by the early cut, back on the stream (args, kwargs as a forward pre-hook returns them)."""
        tangent = self._tangents.pop(id(module), None)
        if tangent is None:
            return None
        stream = args[0] if args else kwargs["hidden_states"]
        dual = fwAD.make_dual(stream, tangent.to(stream.dtype))  # FSDP2 may have cast the stream (param_dtype)
        if args:
            return (dual, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": dual}

    def recorded(self, name: str, point: torch.Tensor) -> None:
        """Point `name` recorded `point` (its output, graph intact): gather its unit's parameters when the
        point's feedback arrives, and start gathering the next unit's."""
        unit = self.units.get(name)
        if unit is None:
            return
        following = self._next.get(name)

        def gather(grad: torch.Tensor) -> torch.Tensor:
            unit.unshard()  # waits; nothing happens if gathered already (or never freed)
            if following is not None:
                following.unshard(async_op=True)  # waited for when its own point's feedback arrives
            return grad
        point.register_hook(gather)
