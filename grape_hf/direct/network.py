"""The one mechanism of the direct rules (DFA, GrAPE, DRTP): feedback points wired to one error tap.

- A *point* hook records a module's output for the tap and hands the rest of the network a
  detached copy, so no gradient path runs from one segment to the next.
- A *cut* hook detaches every tensor a block receives (the residual stream, shared position
  tensors), so nothing bypasses the points.
- A point dropped for its frozen segment (`Placement.frozen`: a base model frozen under PEFT adapters)
  only detaches its output: no record, no matrix, no feedback; while estimating its tangent flows on.
- The *error tap* is one autograd Function (`ErrorTap`) whose inputs are `z` (the head's input or
  the logits) and every point's tensor. Its forward returns `z`; its backward receives `e = dL/dz`
  (already loss-scaled and divided for gradient accumulation) and returns `e` for `z` and `B_k e`
  for point k. So the Trainer's own `accelerator.backward(loss)` reaches every parameter, and each
  segment gets exactly the local backward of its feedback. A point (batch, positions, d) under an
  error (batch, classes) gets one `B_k e` broadcast over the positions that the model call's
  `attention_mask` marks as tokens (`matrices.real_positions`), so batches may differ in length.

All hooks return at once when gradients are off (evaluation, generation). The network holds no
rule state; its modes are context managers that its rule enters:
- `bypassed()`: the hooks do nothing (a true BP step);
- `observing()`: points and `z` are recorded, nothing is cut (the true-alignment probe);
- `estimating(draw)`: inside `forward_ad.dual_level()`, each point adds `u_k = draw(name, h_k)` to
  the forward tangent while cutting the backward path, cuts keep tangents, and the tap keeps the
  tangent `d = sum_k J_k u_k` that reaches it and hands the head a tangent-free `z` (GrAPE);
- `isolating(source)`: the tap's backward lets only one source through (the locality audit);
- `segments_in_parallel()`: with `parallel_backward` threads, the tap of a training forward hands the
  segments' local backwards to them (`parallel.py`) instead of to the engine.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..fsdp import ShardedFeedback, is_fully_sharded
from .matrices import FeedbackMatrices, broadcasts, point_features, real_positions
from .parallel import SegmentThreads
from .placement import EMBEDDINGS, Placement

TAP = "error tap"  # source name of the tap's own error in audits


def _identity(error: torch.Tensor) -> torch.Tensor:
    return error


@dataclass
class Observation:
    """What an observing forward recorded: `points` (name -> the point's tensor, graph intact), `z`
    (the tensor at the tap) and `signal` (what the matrices project, as a function of `e`)."""

    network: "FeedbackNetwork"
    points: dict[str, torch.Tensor] = field(default_factory=dict)
    z: torch.Tensor | None = None
    signal: object = _identity
    positions: dict[str, torch.Tensor | None] = field(default_factory=dict)  # `real_positions` by point

    def feedback(self, error: torch.Tensor) -> dict[str, torch.Tensor]:
        """`B_k s(e)` for every recorded point, float32, each of its point's shape; `error` (*lead, features)."""
        signal = self.signal(error)
        out = {}
        for name, point in self.points.items():
            self.network.matrix_for(name, point, self.z)
            out[name] = self.network.matrices.project(name, signal, point.shape, torch.float32,
                                                      self.positions.get(name))
        return out


@dataclass
class Estimate:
    """An estimating forward: `draw(name, h)` gives point `name`'s perturbation for its tensor `h`;
    afterwards `perturbations` (name -> u_k, the point's shape), `tangent` (d = sum_k J_k u_k,
    the tap's shape; None if the forward never reached the tap) and `positions` (name -> the
    point's `real_positions`, None unless it broadcasts)."""

    draw: object
    perturbations: dict[str, torch.Tensor] = field(default_factory=dict)
    tangent: torch.Tensor | None = None
    positions: dict[str, torch.Tensor | None] = field(default_factory=dict)
    stop_at_tap: bool = False  # raise `TapReached` once the tangent is kept (a forward that trains nothing)


class TapReached(Exception):
    """Raised by the tap of an estimating forward with `stop_at_tap`: the tangent is kept, and the head and the
    loss after it would only cost time (GrAPE's estimate on part of the batch catches it)."""


_BYPASS = "bypass"


class ErrorTap(torch.autograd.Function):
    """Forward: `z` unchanged. Backward: `e` for `z`, `B_k s(e)` for each point tensor (`s`: the
    rule's signal, the error itself but for DRTP), broadcast over the `positions[k]` of a point that
    has them (`matrices.real_positions`)."""

    @staticmethod
    def forward(ctx, network: "FeedbackNetwork", names: tuple[str, ...], signal, positions: tuple,
                segments: tuple | None, z: torch.Tensor, *points: torch.Tensor):
        ctx.network = network
        ctx.names = names
        ctx.signal = signal
        ctx.positions = positions
        # `segments`: the point tensors when the segments run on threads (`direct/parallel.py`); not inputs
        # then, so the engine never reaches the segments itself (`points` is the threads' `anchor` alone).
        ctx.segments = segments
        ctx.parallel = segments is not None
        ctx.point_meta = [(p.shape, p.dtype) for p in (points if segments is None else segments)]
        return z.view_as(z)

    @staticmethod
    def backward(ctx, error: torch.Tensor):
        network = ctx.network
        only = network.isolated  # None in training; one source name during the locality audit
        signal = ctx.signal(error)
        segments, ctx.segments = ctx.segments, None  # their graphs go once their backward has run
        if ctx.parallel and segments is None:
            raise RuntimeError("A second backward through one training forward (retain_graph=True) with "
                               "parallel_backward: the segments' backwards ran in the first and freed their graphs. "
                               "Run one backward per forward, or set parallel_backward=0.")

        def feedback(i: int) -> torch.Tensor | None:
            name, (shape, dtype) = ctx.names[i], ctx.point_meta[i]
            wanted = (segments is not None or ctx.needs_input_grad[6 + i]) and only in (None, name)
            return network.matrices.project(name, signal, shape, dtype, ctx.positions[i]) if wanted else None

        error = error if only in (None, TAP) else None
        if not ctx.parallel:
            return (None, None, None, None, None, error, *map(feedback, range(len(ctx.names))))
        network.segment_threads.backward(list(segments), feedback)
        return None, None, None, None, None, error, None  # nothing for the anchor


def _output_tensor(output, name: str) -> torch.Tensor:
    """The tensor of module `name`'s output (itself, or the first item of a tuple)."""
    tensor = output[0] if isinstance(output, tuple) else output
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"Module {name!r} outputs a {type(output).__name__}, not a tensor or a tuple starting with one, so it "
            "cannot be a feedback point or carry the error tap: choose modules whose output is a hidden state (a "
            "block, a residual branch, a layer) in feedback_modules, or another head_module."
        )
    return tensor


def _replace_output_tensor(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _cut_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with no backward path; a forward-AD tangent, if any, is kept (its value only: the
    tangent's own autograd history, recorded because its ops involve the parameters, is never
    used, and dropping it lets the upstream segment's tangent graph go: GrAPE's activations held
    for backward fell from 1.91x to 1.26x BP's on a GPT-2, see benchmarks/step_time.py)."""
    primal, tangent = fwAD.unpack_dual(tensor)
    if tangent is not None:
        return fwAD.make_dual(primal.detach(), tangent.detach())
    return tensor.detach() if tensor.requires_grad else tensor


def _cut(value):
    """`value` with every tensor cut (through tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return _cut_tensor(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v) for v in value)
    if isinstance(value, dict):
        return {k: _cut(v) for k, v in value.items()}
    return value


class FeedbackNetwork:
    """Installs a `Placement`'s points, cuts and tap on `model` and projects the error through `matrices`.

    Args:
        model: the model; hooks are registered through `hook` (the owning rule's, for `remove`).
        placement: where the points, cuts and tap are.
        matrices: the feedback matrices by point name, created on first use.
        hook: keeps a hook handle (`Rule.hook`).
        make_signal: called at the tap of each training forward; returns the function that maps the
            error `e` (*lead, error_features) to what the matrices project (default: `e` itself).
        parallel_backward: threads that run the segments' local backwards at once (0: none, the engine
            runs them as one backward).

    Attributes:
        isolated: None in training; inside `isolating(source)`, the one source the tap lets through.
        segment_threads: the `SegmentThreads` of `parallel_backward`, or None.
    """

    def __init__(self, model: nn.Module, placement: Placement, matrices: FeedbackMatrices, hook,
                 make_signal=None, parallel_backward: int = 0):
        self.placement = placement
        self.matrices = matrices
        self.make_signal = make_signal
        self.isolated: str | None = None
        self.segment_threads = SegmentThreads(parallel_backward) if parallel_backward else None
        self._parallel = False  # inside `segments_in_parallel`
        self.taps = 0  # training forwards that reached the tap, so a rule can tell one that did not
        self._mode: Observation | Estimate | str | None = None
        self._recorded: dict[str, torch.Tensor] = {}
        self._attention_mask: torch.Tensor | None = None  # of this forward's model call: `real_positions`
        self._hook = hook
        self.sharded: ShardedFeedback | None = None  # made at the first forward of a model sharded by FSDP2
        hook(model.register_forward_pre_hook(self._start_forward, with_kwargs=True))
        for name in placement.cuts:
            hook(model.get_submodule(name).register_forward_pre_hook(
                self._make_cut(name, record_embeddings=name == placement.embedding_block), with_kwargs=True))
        for name in placement.points:
            hook(model.get_submodule(name).register_forward_hook(self._make_point(name)))
        for name in placement.frozen:  # the embeddings' tensor is the first block's input: cut already
            if name != EMBEDDINGS:
                hook(model.get_submodule(name).register_forward_hook(self._make_frozen(name)))
        head = model.get_submodule(placement.head)
        if placement.error_point == "head_input":
            hook(head.register_forward_pre_hook(self._tap_input))
        else:
            hook(head.register_forward_hook(self._tap_output))

    def clear(self) -> None:
        """Drop the tensors of a forward that stopped before the tap."""
        self._recorded.clear()

    def close(self) -> None:
        """Drop the recorded tensors and stop the segment threads (the rule is removed)."""
        self.clear()
        if self.segment_threads is not None:
            self.segment_threads.close()

    def pending(self) -> list[str]:
        """The points recorded in this forward that have not reached the tap (yet)."""
        return list(self._recorded)

    # Modes -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _entered(self, mode):
        if self._mode is not None:
            raise RuntimeError(f"The feedback network is already in mode {self._mode!r}; modes do not nest.")
        self._mode = mode
        try:
            yield mode
        finally:
            self._mode = None

    def bypassed(self):
        """Inside, the hooks do nothing: the model runs (and backpropagates) as plain BP."""
        return self._entered(_BYPASS)

    def observing(self):
        """Inside, points and the tap only record (yields the `Observation`); nothing is cut."""
        return self._entered(Observation(self))

    def estimating(self, draw, stop_at_tap: bool = False):
        """Inside (and inside `forward_ad.dual_level()`), points add `draw(name, h_k)` to the tangent;
        yields the `Estimate` (with `stop_at_tap`, the tap raises `TapReached` once it kept the tangent)."""
        return self._entered(Estimate(draw, stop_at_tap=stop_at_tap))

    @contextlib.contextmanager
    def isolating(self, source: str):
        """Inside, the tap's backward passes only `source` (a point name, or `TAP` for `e` itself)."""
        self.isolated = source
        try:
            yield
        finally:
            self.isolated = None

    @contextlib.contextmanager
    def segments_in_parallel(self):
        """Inside, with `segment_threads`, the tap hands the segments' backwards to the threads (for the
        training forwards: a forward whose backward must return the gradients, as the locality audit's
        `torch.autograd.grad` does, stays outside). Without threads it changes nothing."""
        self._parallel = self.segment_threads is not None
        try:
            yield
        finally:
            self._parallel = False

    # Hooks -----------------------------------------------------------------------------------
    def _active(self) -> bool:
        # An estimating forward may run without autograd (GrAPE's `grape_estimate_stride`): only its tangents count.
        return (torch.is_grad_enabled() or isinstance(self._mode, Estimate)) and self._mode != _BYPASS

    def _start_forward(self, module, args, kwargs):
        self._recorded.clear()  # a forward that stopped early must not leak tensors into the next
        if self.sharded is None and is_fully_sharded(module):  # sharded after the rule was installed
            self.sharded = ShardedFeedback(self, module, self._hook)
        # Passed by name, as the Trainer and collators do; a mask passed by position is not seen, and then
        # padding takes feedback like a token.
        mask = kwargs.get("attention_mask")
        self._attention_mask = mask if isinstance(mask, torch.Tensor) else None

    def _record(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Keep `tensor` for the tap; give the network a copy with no gradient path (plus `u_k` on
        its tangent while estimating)."""
        if name in self._recorded:
            raise RuntimeError(f"Feedback point {name!r} ran twice in one forward pass; a point must be a module "
                               "that runs once per forward (shared or recomputed modules cannot be points).")
        primal, tangent = fwAD.unpack_dual(tensor)
        mode = self._mode
        if primal.requires_grad:
            self._recorded[name] = primal
            if self.sharded is not None:
                self.sharded.recorded(name, primal)
        elif torch.is_grad_enabled() and not isinstance(mode, Observation):
            # Its feedback would reach nothing: a matrix, an estimate and a matmul for no parameter, and the point
            # would have no matrix to save. `trainable_points` drops such points at install; one that gets here
            # was placed on a frozen segment by hand, or its parameters were frozen after the rule was installed.
            raise RuntimeError(
                f"Feedback point {name!r} carries no gradient in this training forward: no trainable parameter of its "
                "segment took part in it (frozen after the rule was installed, a placement given by hand, or inputs "
                "that bypass them, as inputs_embeds bypass the input embeddings), so its feedback would reach "
                "nothing. Freeze parameters before the trainer installs the rule (PEFT's get_peft_model does), or "
                "leave the point out (feedback_modules, feedback_embeddings=False).")
        if isinstance(mode, Observation):
            return tensor
        if not isinstance(mode, Estimate):
            return primal.detach()
        u = mode.perturbations[name] = mode.draw(name, primal)
        return fwAD.make_dual(primal.detach(), u if tangent is None else tangent.detach() + u)  # see _cut_tensor

    def cut_inputs(self, args: tuple, kwargs: dict, record_embeddings: bool):
        """A cut block's inputs (args, kwargs) with every tensor cut, the first recorded as the embeddings
        point before when `record_embeddings`; None while observing (recorded, nothing cut)."""
        if record_embeddings:
            if args:
                args = (self._record(EMBEDDINGS, args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = self._record(EMBEDDINGS, kwargs["hidden_states"])
        if isinstance(self._mode, Observation):
            return None
        return _cut(args), _cut(kwargs)

    def _make_cut(self, name: str, record_embeddings: bool):
        def cut(module, args, kwargs):
            if not self._active():
                return None
            if self.sharded is not None and name in self.sharded.cuts:  # cut before FSDP2's hook already
                return self.sharded.restore_tangent(module, args, kwargs)
            return self.cut_inputs(args, kwargs, record_embeddings)
        return cut

    def _make_frozen(self, name: str):
        """A point dropped for its frozen segment: its output is cut (detached; a forward tangent kept), no feedback."""
        def frozen(module, args, output):
            if not self._active() or isinstance(self._mode, Observation):
                return None
            return _replace_output_tensor(output, _cut_tensor(_output_tensor(output, name)))
        return frozen

    def _make_point(self, name: str):
        def point(module, args, output):
            if not self._active():
                return None
            return _replace_output_tensor(output, self._record(name, _output_tensor(output, name)))
        return point

    def _tap(self, z: torch.Tensor) -> torch.Tensor:
        """Route `z` and every recorded point through `ErrorTap`; create missing matrices. While
        estimating, keep z's tangent in the `Estimate` and pass on its primal only."""
        mode = self._mode
        signal = self.make_signal() if self.make_signal is not None else _identity
        self.taps += 1
        if isinstance(mode, Observation):
            mode.points.update(self._recorded)
            mode.positions.update({name: self.positions(point.shape, z) for name, point in self._recorded.items()})
            mode.z, mode.signal = z, signal
            self._recorded.clear()
            return z
        z, tangent = fwAD.unpack_dual(z)
        if isinstance(mode, Estimate):
            # Detached: the tangent's own autograd history (its ops involve the parameters) is not needed.
            mode.tangent = torch.zeros_like(z) if tangent is None else tangent.detach()
            mode.positions = {name: self.positions(u.shape, z) for name, u in mode.perturbations.items()}
            if mode.stop_at_tap:
                raise TapReached
        if not self._recorded:
            return z
        names = tuple(self._recorded)
        points = [self._recorded[n] for n in names]
        self._recorded.clear()
        for name, point in zip(names, points):
            self.matrix_for(name, point, z)
        positions = tuple(self.positions(point.shape, z) for point in points)
        if self._parallel:
            return ErrorTap.apply(self, names, signal, positions, tuple(points), z, self.segment_threads.anchor)
        return ErrorTap.apply(self, names, signal, positions, None, z, *points)

    def positions(self, point_shape: torch.Size, z: torch.Tensor) -> torch.Tensor | None:
        """`matrices.real_positions` of a point of `point_shape` under the error `z`, with this forward's
        attention mask, on z's device."""
        return real_positions(point_shape, z.shape, self._attention_mask, z.device)

    def matrix_for(self, name: str, point: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """B_k for `point` (*lead, *features) and the error `z` (*lead, error_features), created on
        first use (`matrices.point_features` rows); raises when the point does not share the error's
        leading dimensions."""
        lead = z.shape[:-1]
        if point.shape[: len(lead)] != lead:
            raise ValueError(
                f"Feedback point {name!r} has shape {tuple(point.shape)} but the error at "
                f"{self.placement.tap_name} has shape {tuple(z.shape)}: a point must share the error's leading "
                f"dimensions {tuple(lead)}. Read the error elsewhere (error_point) or choose other points."
            )
        flattened = math.prod(point.shape[len(lead):]) if broadcasts(point.shape, z.shape) else None
        return self.matrices.get(name, point_features(point.shape, z.shape), z.shape[-1], z.device, flattened)

    def _tap_input(self, module, args):
        if not self._active():
            return None
        return (self._tap(args[0]), *args[1:])

    def _tap_output(self, module, args, output):
        if not self._active():
            return None
        return _replace_output_tensor(output, self._tap(_output_tensor(output, self.placement.head)))
