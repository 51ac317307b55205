"""PEPITA, "Present the Error to Perturb the Input To modulate Activity" (Dellaferrera & Kreiman 2022,
"Error-driven input modulation: solving the credit assignment problem without a backward pass", ICML;
Algorithm 1), with the refinements of Srinivasan et al. 2023 ("Forward learning with top-down
feedback: empirical and analytical characterization") as options.

Two forward passes, no backward through the network:
1. the standard pass on the input x: hidden activities h_l and the error `e = softmax(z) - y*`
   (N, classes), the per-example cross-entropy gradient;
2. the modulated pass on `x - F e`, `F` (input_features, classes) fixed and random: activities h_l^mod
   (Srinivasan et al.'s and the GrAPE paper's sign; the 2022 paper adds F e, the same rule for a random
   F drawn symmetrically about 0, but under weight mirroring F follows W^T and only `-` descends).
Updates: `dW_l = (h_l - h_l^mod) (h_{l-1}^mod)^T` for the hidden layers (h_0^mod = x - F e), and
`dW_L = e (h_{L-1}^mod)^T` for the output layer, averaged over the batch. A bias, a weight on a
constant input, gets the batch sum of the same left factor. `h_l` is the input of weight layer l+1:
the activity after the nonlinearity (and dropout, whose masks are made the same in both passes by
replaying the random state).

How one backward delivers it (no `.grad` written by hand, no nested backward, see ARCHITECTURE.md): the
modulated pass cuts every layer's input, so each nn.Linear output y_l sees only its own weights; the
returned loss (the standard pass's value) is tied to those outputs by `PepitaDeltas`, whose backward hands
y_l the gradient `c (h_l - h_l^mod) / N` (output layer: `c e / N`), with c the gradient reaching the
loss (loss scaling, gradient accumulation). The weight gradient of a linear layer is exactly
`grad(y_l)^T h_{l-1}^mod`: PEPITA's update.

Refinements (Srinivasan et al. 2023): F's scale (`pepita_f_scale`, entries of standard deviation
`pepita_f_scale * sqrt(2 / input_features)`, 0.05 in both papers), weight decay (the Trainer's own
`weight_decay`) and weight mirroring (`pepita_mirror_lr`): F becomes a product of per-layer factors
B_1 ... B_L, each turned towards W_l^T by noise fed through the layer's weight, renormalised to F's
scale after every step. Their mirror feeds the noise through the whole block (dropout, ReLU); here
through the weight alone (the weight mirror of Akrout et al. 2019), since an MLP's nonlinearities are
not modules PEPITA can find. PEPITA has no convolutional version: only multilayer perceptrons are accepted.
"""

import math

import torch
from torch import nn

from ..direct.matrices import point_seed
from ..direct.placement import find_head
from ..rule import Rule

INPUT = "input"  # name of F among the matrices: it projects the error onto the input
MIRROR = "mirror."  # prefix of F's per-layer factors under weight mirroring


class PepitaDeltas(torch.autograd.Function):
    """Forward: the standard pass's loss. Backward: `c * delta_l` for each layer output y_l."""

    @staticmethod
    def forward(ctx, deltas: list[torch.Tensor], loss: torch.Tensor, *outputs: torch.Tensor):
        ctx.deltas = deltas
        ctx.dtypes = [output.dtype for output in outputs]
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *[(grad * delta).to(dtype) for delta, dtype in zip(ctx.deltas, ctx.dtypes)])


def chain(factors: list[torch.Tensor]) -> torch.Tensor:
    """B_1 B_2 ... B_L: (in_features_1, out_features_L) from factors (in_features_l, out_features_l)."""
    return torch.linalg.multi_dot(factors) if len(factors) > 1 else factors[0]


def pepita_layers(model: nn.Module, head: str) -> dict[str, nn.Linear]:
    """The nn.Linear layers of a multilayer perceptron by name, in registration order, ending with
    `head`; raises a `ValueError` naming any other module with trainable weights."""
    layers, others = {}, []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.Linear):
            layers[name] = module
        else:
            others.append(f"{name} ({type(module).__name__})")
    if others:
        raise ValueError(
            f"PEPITA trains multilayer perceptrons only (it has no convolutional or attention version: Dellaferrera & "
            f"Kreiman 2022, Srinivasan et al. 2023), but {type(model).__name__} has weights outside nn.Linear layers: "
            f"{', '.join(others)}. Use rule='dfa', 'drtp', 'fa' or 'grape' for this model."
        )
    if not layers or list(layers)[-1] != head:
        raise ValueError(f"PEPITA needs the output layer {head!r} to be the last nn.Linear of {type(model).__name__}; "
                         f"its nn.Linear layers are {list(layers)}.")
    return layers


class PEPITA(Rule):
    """PEPITA's hooks on the nn.Linear layers of an MLP, the matrix F, and the two-pass training forward.

    Attributes:
        layers: the nn.Linear layers by name, the output layer last.
        matrices: F under the name 'input', (input_features, classes); with mirroring (mirror_lr > 0)
            its factors instead, 'mirror.<layer>' (in_features, out_features) each.
        f_scale: F's entries have standard deviation f_scale * sqrt(2 / input_features).
        mirror_lr, mirror_decay, mirror_noise: weight mirroring's step size (0: off), weight decay and
            noise standard deviation.
    """

    name = "pepita"
    points_reason = ("its updates come from a second forward pass, not from feedback points, and every layer's input "
                     "is already cut in that pass. The locality audit, like the probe, applies to "
                     "'dfa', 'grape' and 'drtp'.")

    def __init__(self, model: nn.Module, args):
        head = find_head(model, args.head_module)
        self.layers = pepita_layers(model, head)
        super().__init__(model, args)
        self.head = head
        self.f_scale = args.pepita_f_scale
        self.mirror_lr = args.pepita_mirror_lr
        self.mirror_decay = args.pepita_mirror_weight_decay
        self.mirror_noise = args.pepita_mirror_noise
        self.point_names = tuple(MIRROR + name for name in self.layers) if self.mirror_lr else (INPUT,)
        self._noise_seed = point_seed(self.matrices.seed, "mirror noise")
        self._noise: torch.Generator | None = None  # the mirroring noise, seeded from feedback_seed
        self._noise_state: torch.Tensor | None = None  # a checkpoint's generator state, not yet applied
        self._first = next(iter(self.layers.values()))
        self._pass: str | None = None  # None (hooks idle), "standard" or "modulated"
        self._error: torch.Tensor | None = None  # e (N, classes) during the modulated pass
        self._seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (layer, input, output) of this pass
        for name, layer in self.layers.items():
            self.hook(layer.register_forward_pre_hook(self._make_input_hook()))
            self.hook(layer.register_forward_hook(self._make_output_hook(name)))

    @property
    def f_std(self) -> float:
        """The papers' standard deviation of F's entries: f_scale * sqrt(2 / input_features)."""
        return self.f_scale * math.sqrt(2.0 / self._first.in_features)

    def input_matrix(self, device: torch.device) -> torch.Tensor:
        """F, (input_features, classes), float32, created on first use at the papers' scale; with
        mirroring, the product of the per-layer factors `mirror_factors`."""
        if self.mirror_lr:
            return chain(self.mirror_factors(device))
        features, classes = self._first.in_features, list(self.layers.values())[-1].out_features
        fresh = INPUT not in self.matrices.tensors
        matrix = self.matrices.get(INPUT, features, classes, device)
        if fresh:  # rescale the seeded draw (std 1/sqrt(classes), or sqrt(2/classes) for kaiming) to the papers' std
            drawn = math.sqrt((2.0 if self.matrices.init == "kaiming_uniform" else 1.0) / classes)
            matrix = self.matrices.tensors[INPUT] = matrix * (self.f_std / drawn)
        return matrix

    def mirror_factors(self, device: torch.device) -> list[torch.Tensor]:
        """With mirroring, F = B_1 B_2 ... B_L: one factor per layer, B_l (in_features_l, out_features_l)
        like W_l^T, seeded per layer and, when new, normalised together (`_normalize`)."""
        names = [MIRROR + name for name in self.layers]
        fresh = names[0] not in self.matrices.tensors
        factors = [self.matrices.get(name, layer.in_features, layer.out_features, device)
                   for name, layer in zip(names, self.layers.values())]
        return self._normalize(factors) if fresh else factors

    def _normalize(self, factors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scale every factor alike so that their product F has the papers' std (Srinivasan et al.'s
        `normalize_B`); stores and returns them."""
        ratio = (self.f_std / chain(factors).std().clamp_min(1e-12)) ** (1.0 / len(factors))
        factors = [factor * ratio for factor in factors]
        for name, factor in zip(self.layers, factors):
            self.matrices.tensors[MIRROR + name] = factor
        return factors

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Once mirroring drew noise, `mirror_noise` (its generator's uint8 state)."""
        state = self._noise.get_state() if self._noise is not None else self._noise_state  # loaded, not yet used
        return {"mirror_noise": state} if state is not None else {}

    def load_extra_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore `extra_state` (the noise generator is rebuilt from the saved state when `mirror` runs)."""
        state = dict(state)
        self._noise_state = state.pop("mirror_noise", None)
        super().load_extra_state(state, where)
        self._noise = None

    def mirror(self, batch_size: int, device: torch.device) -> None:
        """One weight-mirroring step (Srinivasan et al. 2023, after Akrout et al. 2019): for every layer,
        centred noise x ~ mirror_noise * N(0, I) (batch_size, in_features) through its weight gives
        y = x W^T, and B_l <- B_l + mirror_lr (x^T y / batch_size - mirror_decay B_l) (SGD with weight
        decay), which turns B_l towards W_l^T; then the factors are normalised again."""
        if self._noise is None or self._noise.device != device:
            self._noise = torch.Generator(device=device).manual_seed(self._noise_seed)
            saved, self._noise_state = self._noise_state, None
            if saved is not None:
                try:
                    self._noise.set_state(saved)
                except RuntimeError as error:
                    raise RuntimeError(f"The saved mirroring noise state does not fit a generator on {device} "
                                       f"({error}): resume on the device type it was saved on.") from error
        mirrored = []
        for (name, layer), factor in zip(self.layers.items(), self.mirror_factors(device)):
            x = self.mirror_noise * torch.randn(batch_size, layer.in_features, generator=self._noise, device=device)
            x = x - x.mean()
            y = x @ layer.weight.detach().float().T
            mirrored.append(factor + self.mirror_lr * (x.T @ y / batch_size - self.mirror_decay * factor))
        self._normalize(mirrored)

    def forward(self, forward, inputs: dict, step: int, first_micro_batch: bool) -> tuple[torch.Tensor, object]:
        """PEPITA's two passes on `inputs`; `forward(inputs)` is the Trainer's loss computation and
        returns (loss, outputs). Returns the standard pass's (loss, outputs), the loss tied to the
        modulated pass so that its backward delivers PEPITA's updates."""
        labels = inputs.get("labels")
        if labels is None or labels.dim() != 1 or labels.is_floating_point():
            shape = None if labels is None else tuple(labels.shape)
            raise ValueError(f"PEPITA's error `softmax(logits) - one_hot(labels)` needs class labels of shape (N,) in "
                             f"the batch ('labels'); got {shape}.")
        device = labels.device
        if self.mirror_lr:
            self.mirror(len(labels), device)
        # Replay the random state in the second pass: the same dropout masks, as in both papers' code.
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
            loss, outputs = self._run("standard", forward, inputs)
        standard = self._take()
        logits = standard[-1][2]
        self._error = (torch.softmax(logits.float(), dim=-1)
                       - nn.functional.one_hot(labels, logits.shape[-1]).float())
        try:
            self._run("modulated", forward, inputs)
        finally:
            error, self._error = self._error, None
        modulated = self._take()
        n = len(labels)
        deltas = [(standard[l + 1][1].float() - modulated[l + 1][1].float()) / n for l in range(len(standard) - 1)]
        deltas.append(error / n)
        return PepitaDeltas.apply(deltas, loss, *[output for _, _, output in modulated]), outputs

    def _run(self, name: str, forward, inputs):
        self._pass = name
        try:
            return forward(inputs)
        finally:
            self._pass = None

    def _take(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """This pass's (layer, input, output), checked to be every layer once, in order."""
        seen, self._seen = self._seen, []
        if [name for name, _, _ in seen] != list(self.layers):
            raise RuntimeError(f"PEPITA needs a multilayer perceptron whose nn.Linear layers run once each, in order "
                               f"{list(self.layers)}; this forward ran {[name for name, _, _ in seen]}.")
        return seen

    def _make_input_hook(self):
        def modulate_and_cut(module, args):
            if self._pass is None:
                return None
            x = args[0]
            if self._pass == "modulated" and module is self._first:
                x = x - (self._error @ self.input_matrix(x.device).T).to(x.dtype)
            x = x.detach()  # each layer sees only its own weights (the standard pass runs without grad anyway)
            self._seen.append(("", x, None))
            return (x, *args[1:])
        return modulate_and_cut

    def _make_output_hook(self, name: str):
        def record(module, args, output):
            if self._pass is not None:
                self._seen[-1] = (name, self._seen[-1][1], output)
        return record
