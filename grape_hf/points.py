"""The one mechanism: feedback points wired to one error hub (DESIGN section 2).

- A *point* hook records a module's output for the hub and hands the rest of the network a
  detached copy, so no gradient path runs from one segment to the next.
- A *cut* hook detaches every tensor a block receives (the residual stream, shared position
  tensors), so nothing bypasses the points.
- The *error tap* is one autograd Function whose inputs are `z` (the head's input or the logits)
  and every point's tensor. Its forward returns `z`; its backward receives `e = dL/dz` (already
  loss-scaled and divided for gradient accumulation) and returns `e` for `z` and `B_k e` for
  point k. So the Trainer's own `accelerator.backward(loss)` reaches every parameter, and each
  segment gets exactly the local backward of its feedback.

All hooks return at once when gradients are off (evaluation, generation) or while `bypass` is
set (a true BP step: BP calibration). The alignment probe observes instead (`true_alignment`).

GrAPE's estimate runs in the same forward under `forward_ad.dual_level()` (`estimating`): each
point adds a fresh perturbation `u_k ~ N(0, I)` to the forward tangent while cutting the backward
path, cuts keep tangents, and the tap keeps the tangent `d = sum_k J_k u_k` that reaches it and
hands the head a tangent-free `z`.
"""

import math
import weakref

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .feedback import FeedbackMatrices
from .placement import EMBEDDINGS, Placement, resolve_placement

TAP = "error tap"  # source name of the tap's own error in audits

_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, FeedbackNetwork]" = weakref.WeakKeyDictionary()


def claim(model: nn.Module, owner) -> None:
    """Record that `owner` (a rule's installed hooks) holds `model`; refuse a second owner."""
    if model in _INSTALLED:
        raise RuntimeError(
            f"This {type(model).__name__} already carries grape_hf feedback (from another GrapeTrainer or "
            "audit); two sets of hooks would compute neither rule. Call `.feedback.remove()` on the trainer "
            "that installed it first, or build a fresh model."
        )
    _INSTALLED[model] = owner


def release(model: nn.Module | None, owner) -> None:
    """Undo `claim` (`model` None: already garbage-collected)."""
    if model is not None and _INSTALLED.get(model) is owner:
        del _INSTALLED[model]


class ErrorHub(torch.autograd.Function):
    """Forward: `z` unchanged. Backward: `e` for `z`, `B_k e` for each point tensor."""

    @staticmethod
    def forward(ctx, network: "FeedbackNetwork", names: tuple[str, ...], z: torch.Tensor, *points: torch.Tensor):
        ctx.network = network
        ctx.names = names
        ctx.point_meta = [(p.shape, p.dtype) for p in points]
        return z.view_as(z)

    @staticmethod
    def backward(ctx, error: torch.Tensor):
        network = ctx.network
        only = network.audit_source  # None in training; one source name during the locality audit
        signal = network.point_signal(error)
        feedback = []
        for i, (name, (shape, dtype)) in enumerate(zip(ctx.names, ctx.point_meta)):
            wanted = ctx.needs_input_grad[3 + i] and only in (None, name)
            feedback.append(network.matrices.project(name, signal, shape, dtype) if wanted else None)
        return (None, None, error if only in (None, TAP) else None, *feedback)


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


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

    Attributes:
        placement: where the points, cuts and tap are.
        matrices: the feedback matrices, by point name.
        audit_source: None in training; during the locality audit, the one source (a point name
            or `TAP`) whose signal the hub lets through.
        bypass: while True the hooks do nothing: the model runs (and backpropagates) as plain BP.
        estimating: while True (inside `forward_ad.dual_level()`), points add perturbations drawn
            from `generator` to the tangent; `perturbations` and `tangent` hold them afterwards.
            Under data parallelism (`shard`), each process uses its slice of the global batch's draw.
        aligner: the rule's feedback update (GrAPE's `GrapeAligner`), or None for fixed feedback.
    """

    def __init__(self, model: nn.Module, placement: Placement, matrices: FeedbackMatrices):
        claim(model, self)
        self._model = weakref.ref(model)
        self.placement = placement
        self.matrices = matrices
        self.audit_source: str | None = None
        self.bypass = False
        self.estimating = False
        self.generator: torch.Generator | None = None
        self.shard = (0, 1)  # (this process, processes): which slice of the global batch's perturbations is ours
        self.perturbations: dict[str, torch.Tensor] = {}  # point -> u_k, the point's shape
        self.tangent: torch.Tensor | None = None  # d = sum_k J_k u_k, the tap's shape
        self.aligner = None  # GrAPE's `GrapeAligner`; None for DFA
        self._recorded: dict[str, torch.Tensor] = {}
        self._observing = False  # `true_alignment`: record points and z, change nothing
        self._observed_z: torch.Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._start_forward)]
        for name in placement.cuts:
            self._handles.append(model.get_submodule(name).register_forward_pre_hook(
                self._make_cut(record_embeddings=name == placement.embedding_block), with_kwargs=True))
        for name in placement.points:
            self._handles.append(model.get_submodule(name).register_forward_hook(self._make_point(name)))
        head = model.get_submodule(placement.tap_module)
        if placement.error_point == "head_input":
            self._handles.append(head.register_forward_pre_hook(self._tap_input))
        else:
            self._handles.append(head.register_forward_hook(self._tap_output))

    @property
    def point_names(self) -> tuple[str, ...]:
        """Feedback points in forward order."""
        return self.placement.point_names

    @property
    def tap_name(self) -> str:
        """Where the error is read, e.g. 'lm_head:input' or 'classifier:output'."""
        side = "input" if self.placement.error_point == "head_input" else "output"
        return f"{self.placement.tap_module}:{side}"

    def remove(self) -> None:
        """Remove every hook: the model computes exactly as before `FeedbackNetwork` was built."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recorded.clear()
        release(self._model(), self)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rule's state outside the model: `matrices.<point>` (point_features, error_features) and,
        with an aligner, `aligner.<key>` (see `GrapeAligner.state_dict`)."""
        state = {f"matrices.{name}": matrix for name, matrix in self.matrices.state_dict().items()}
        if self.aligner is not None:
            state.update({f"aligner.{key}": value for key, value in self.aligner.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str | None = None) -> None:
        """Restore what `state_dict` returned; `source` names the file in later errors."""
        groups: dict[str, dict[str, torch.Tensor]] = {"matrices": {}, "aligner": {}}
        for key, value in state.items():
            group, _, name = key.partition(".")
            if group not in groups or not name:
                raise ValueError(f"Unknown feedback state entry {key!r} in {source or 'the state'}: expected "
                                 "'matrices.<point>' or 'aligner.<key>'.")
            groups[group][name] = value
        unknown = set(groups["matrices"]) - set(self.point_names)
        if unknown:
            raise ValueError(f"{source or 'The feedback state'} holds matrices for {sorted(unknown)}, which are not "
                             f"feedback points of this model (its points: {list(self.point_names)}).")
        if groups["aligner"] and self.aligner is None:
            raise ValueError(f"{source or 'The feedback state'} holds an aligner's state (GrAPE's, or DFA's with "
                             "alignment_probe_steps) but this run has no aligner: use the checkpoint's rule and "
                             "alignment_probe_steps.")
        self.matrices.load_state_dict(groups["matrices"], source)
        if self.aligner is not None:
            self.aligner.load_state_dict(groups["aligner"], source)

    def true_alignment(self, forward) -> dict[str, float]:
        """Per point, cos(B_k e, true dL/dh_k) on one batch: a plain BP forward (`forward()` returns
        the loss) whose point tensors and tap are only observed, then one `autograd.grad` of the loss.
        Costs one forward and one backward; leaves every `.grad` untouched."""
        self._observing = True
        try:
            loss = forward()
        finally:
            self._observing = False
        names = list(self._recorded)
        points = [self._recorded.pop(name) for name in names]
        z = self._observed_z
        self._observed_z = None
        *grads, error = torch.autograd.grad(loss, points + [z])
        signal = self.point_signal(error)
        cosines = {}
        for name, point, grad in zip(names, points, grads):
            self._matrix_for(name, point, z)
            feedback = self.matrices.project(name, signal, point.shape, torch.float32)
            cosines[name] = float(torch.nn.functional.cosine_similarity(feedback.flatten(), grad.float().flatten(),
                                                                        dim=0))
        return cosines

    def point_signal(self, error: torch.Tensor) -> torch.Tensor:
        """What the matrices project to the points: the error `e` (*lead, error_features) itself (DFA,
        GrAPE); DRTP projects the one-hot target instead."""
        return error

    # Hooks -----------------------------------------------------------------------------------
    def _active(self) -> bool:
        return torch.is_grad_enabled() and not self.bypass

    def _start_forward(self, module, args):
        self._recorded.clear()  # a forward that stopped early must not leak tensors into the next
        self.perturbations.clear()
        self.tangent = None

    def _record(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Keep `tensor` for the hub; give the network a copy with no gradient path (plus `u_k` on
        its tangent while estimating)."""
        if name in self._recorded:
            raise RuntimeError(f"Feedback point {name!r} ran twice in one forward pass; a point must be a module "
                               "that runs once per forward (shared or recomputed modules cannot be points).")
        primal, tangent = fwAD.unpack_dual(tensor)
        if primal.requires_grad:
            self._recorded[name] = primal
        if self._observing:
            return tensor
        if not self.estimating:
            return primal.detach()
        u = self._perturbation(primal)
        self.perturbations[name] = u
        return fwAD.make_dual(primal.detach(), u if tangent is None else tangent.detach() + u)  # see _cut_tensor

    def _perturbation(self, like: torch.Tensor) -> torch.Tensor:
        """`u ~ N(0, I)` of `like`'s shape (batch, ...). Each of N processes draws the global batch's
        (N * batch, ...) and keeps its own slice, so N processes of batch b perturb exactly as one
        process of batch N * b does (the price: N times the random numbers, one point at a time)."""
        rank, processes = self.shard
        shape = (like.shape[0] * processes, *like.shape[1:])
        u = torch.randn(shape, generator=self.generator, device=like.device, dtype=like.dtype)
        if processes == 1:
            return u
        return u[rank * like.shape[0]:(rank + 1) * like.shape[0]].clone()  # a copy frees the rest of the draw

    def _make_cut(self, record_embeddings: bool):
        def cut(module, args, kwargs):
            if not self._active():
                return None
            if record_embeddings:
                if args:
                    args = (self._record(EMBEDDINGS, args[0]), *args[1:])
                else:
                    kwargs["hidden_states"] = self._record(EMBEDDINGS, kwargs["hidden_states"])
            if self._observing:
                return None
            return _cut(args), _cut(kwargs)
        return cut

    def _make_point(self, name: str):
        def point(module, args, output):
            if not self._active():
                return None
            return _replace_output_tensor(output, self._record(name, _output_tensor(output)))
        return point

    def _tap(self, z: torch.Tensor) -> torch.Tensor:
        """Route `z` and every recorded point through the hub; create missing matrices. While
        estimating, keep z's tangent in `tangent` and pass on its primal only."""
        if self._observing:
            self._observed_z = z
            return z
        z, tangent = fwAD.unpack_dual(z)
        if self.estimating:
            # Detached: the tangent's own autograd history (its ops involve the parameters) is not needed.
            self.tangent = torch.zeros_like(z) if tangent is None else tangent.detach()
        if not self._recorded:
            return z
        names = tuple(self._recorded)
        points = [self._recorded[n] for n in names]
        self._recorded.clear()
        for name, point in zip(names, points):
            self._matrix_for(name, point, z)
        return ErrorHub.apply(self, names, z, *points)

    def _matrix_for(self, name: str, point: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """B_k for `point` (*lead, *features) and the error `z` (*lead, error_features), created on
        first use; raises when the point does not share the error's leading dimensions."""
        lead = z.shape[:-1]
        if point.shape[: len(lead)] != lead:
            raise ValueError(
                f"Feedback point {name!r} has shape {tuple(point.shape)} but the error at "
                f"{self.tap_name} has shape {tuple(z.shape)}: a point must share the error's leading "
                f"dimensions {tuple(lead)}. Read the error elsewhere (error_point) or choose other points."
            )
        return self.matrices.get(name, math.prod(point.shape[len(lead):]), z.shape[-1], z.device)

    def _tap_input(self, module, args):
        if not self._active():
            return None
        return (self._tap(args[0]), *args[1:])

    def _tap_output(self, module, args, output):
        if not self._active():
            return None
        return _replace_output_tensor(output, self._tap(_output_tensor(output)))


def install(model: nn.Module, args, network_class: type[FeedbackNetwork] = FeedbackNetwork) -> FeedbackNetwork:
    """The points, cuts and tap of `args` (setting or feedback_modules) on `model`, with random
    matrices of `args.feedback_init` seeded by `args.feedback_seed`: what every feedback rule starts from
    (`network_class`: a subclass that changes what the hub projects, as DRTP's)."""
    placement = resolve_placement(model, args)
    return network_class(model, placement, FeedbackMatrices(args.feedback_init, args.feedback_seed))
