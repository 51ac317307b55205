"""The feedback matrices `B_k`: one per feedback point, created on first use, seeded per point.

`B_k` has shape (point_features, error_features): it maps the error's features to the point's
features, the leading (batch, sequence) dimensions being shared (ARCHITECTURE.md). So the
feedback of point k is `e @ B_k.T`, an estimate of the true `J_k^T e` with `J_k = dz/dh_k`.
The matrices live here, never in the model, so a trained model stays a plain checkpoint.

Which features, given the point (*lead, ...) and the error (*lead, error_features):
- (*lead, features), the error's own positions (an LM's tokens): `features`;
- (*lead, positions, features) under an error with no position dimension (a sequence classifier's
  or ViT's logits): `features` alone, the same `B_k e` *broadcast over the positions*, so any
  sequence length works (dynamic padding), weighted per position by `position_weights`;
- more dimensions (a convolution's (channels, height, width), fixed by the architecture): all of
  them flattened, one row of `B_k` per unit.
"""

import hashlib
import math

import torch


def point_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the point `name`: independent of point order and of the global RNG."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def init_feedback_matrix(shape: tuple[int, int], init: str, generator: torch.Generator) -> torch.Tensor:
    """A float32 CPU matrix of `shape` = (point_features, error_features).

    'normal' and 'uniform' have variance 1/error_features, so `B e` keeps the scale of `e` per
    feature; 'kaiming_uniform' is torch's He-uniform (variance 2/error_features); 'identity' is `I`
    (a point as wide as the error, on a pre-LN residual stream: the skip path's own Jacobian).
    """
    fan_in = shape[1]
    matrix = torch.empty(shape)
    if init == "normal":
        return matrix.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
    if init == "uniform":
        bound = math.sqrt(3.0 / fan_in)
        return matrix.uniform_(-bound, bound, generator=generator)
    if init == "kaiming_uniform":
        return torch.nn.init.kaiming_uniform_(matrix, nonlinearity="relu", generator=generator)
    if init == "identity":
        if shape[0] != shape[1]:
            raise ValueError(f"feedback_init='identity' needs every point as wide as the error, but one has "
                             f"{shape[0]} features for an error of {shape[1]}: use 'normal', or read the error where "
                             "it has the points' width (error_point='residual').")
        return torch.eye(shape[0])
    raise ValueError(f"Unknown feedback_init {init!r}; choose 'normal', 'uniform', 'kaiming_uniform' or 'identity'.")


def broadcasts(point_shape: torch.Size, error_shape: torch.Size) -> bool:
    """Whether a point (*lead, positions, features) gets `B_k e` broadcast over its positions: the error
    (*lead, error_features) has no position dimension to share with it."""
    return len(point_shape) == len(error_shape) + 1


def point_features(point_shape: torch.Size, error_shape: torch.Size) -> int:
    """The rows of the point's `B_k`: its last dimension when `broadcasts`, else the product of its
    dimensions after the error's leading ones."""
    if broadcasts(point_shape, error_shape):
        return point_shape[-1]
    return math.prod(point_shape[len(error_shape) - 1:])


def real_positions(point_shape: torch.Size, error_shape: torch.Size, attention_mask: torch.Tensor | None,
                   device: torch.device | None = None) -> torch.Tensor | None:
    """For a point that `broadcasts`: which of its positions take feedback, (*lead, positions) float32
    of 0 and 1; None for any other point.

    The model call's `attention_mask` (*lead, positions), 1 on tokens and 0 on padding, when it
    has the point's positions; else every position is real (no mask, or a point whose positions are
    not the tokens: patches, merged windows). Padding gets no feedback, as under BP, where a pad
    position's hidden state has zero gradient: no token attends to it and the head pools a token.
    The result is on `device`.
    """
    if not broadcasts(point_shape, error_shape):
        return None
    positions = point_shape[:-1]
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(positions):
        return (attention_mask != 0).to(device=device, dtype=torch.float32)
    return torch.ones(positions, device=device)


def position_weights(positions: torch.Tensor) -> torch.Tensor:
    """Each position's share of the broadcast feedback: 1/m at the m real `positions` of an example
    (*lead, positions), 0 at padding.

    Why 1/m: `B_k e` at every position with weight w makes each weight's gradient a w-weighted sum
    over the positions. BP's gradient of a classifier's hidden states, whose head reads one token
    (or the mean of them), sums to O(1) over the positions whatever the length: its
    position-constant part is the mean over positions of `J_n^T e`, which falls as 1/m. So 1/m keeps
    the feedback, and the parameters' gradients, at BP's scale for every length, and an example gets
    the same feedback however much it is padded. GrAPE's target is then the sum over the real
    positions of `J_n^T` (`estimate.jacobian_estimate`), the `B_k` for which `w B_k e` is the
    least-squares fit of the true gradient over the positions.
    """
    return positions / positions.sum(-1, keepdim=True).clamp_min(1.0)


def nonfinite_problem(tensor: torch.Tensor) -> str | None:
    """What is non-finite in a floating tensor ('holds 3 NaN and 1 inf of 1024 values'), or None."""
    if not tensor.is_floating_point():
        return None
    nan, inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
    if not nan and not inf:
        return None
    return f"holds {nan} NaN and {inf} inf of {tensor.numel()} values"


def matrix_problem(matrix) -> str | None:
    """Why `matrix` cannot be a feedback matrix, or None when it can: a matrix is a 2-D
    (point_features, error_features) float32 tensor, finite and not all zeros (a zero matrix sends no
    feedback: its segment would silently stop training)."""
    if not isinstance(matrix, torch.Tensor):
        return f"is a {type(matrix).__name__}, not a tensor"
    if matrix.dtype != torch.float32:
        # Integer or bool matrices truncate the feedback (DFA then leaves most parameters without gradient);
        # fp16/bf16/fp64 ones are not what grape_hf writes: the feedback is computed in float32.
        return f"is {matrix.dtype}, but feedback matrices are float32"
    if matrix.dim() != 2:
        return f"has shape {tuple(matrix.shape)}, but a feedback matrix is 2-D (point_features, error_features)"
    nonfinite = nonfinite_problem(matrix)
    if nonfinite is not None:
        return nonfinite
    if matrix.numel() and not matrix.any():
        return "is all zeros (it would send no feedback)"
    return None


class FeedbackMatrices:
    """The matrices of all points, by point name.

    Args:
        init: the distribution ('normal', 'uniform', 'kaiming_uniform').
        seed: the feedback seed; the same seed gives the same matrices on every process and run.
    """

    def __init__(self, init: str, seed: int):
        self.init = init
        self.seed = seed
        self.tensors: dict[str, torch.Tensor] = {}
        self.loaded_from: str | None = None  # the checkpoint file the matrices came from, for error messages
        # name -> (the matrix tensor known to be I, its in-place version then): see `is_identity`
        self._identities: dict[str, tuple[torch.Tensor, int]] = {}

    def get(self, name: str, point_features: int, error_features: int, device: torch.device,
            flattened_features: int | None = None) -> torch.Tensor:
        """The matrix of point `name`, (point_features, error_features), created on first use.

        Raises when a point's shape changes between steps, which would silently need a different
        matrix, and names the old layout when a checkpoint holds a (flattened_features,
        error_features) matrix for a point that now broadcasts (`flattened_features`: positions x
        features of that point, given for such points).
        """
        matrix = self.tensors.get(name)
        if matrix is None:
            generator = torch.Generator().manual_seed(point_seed(self.seed, name))
            matrix = init_feedback_matrix((point_features, error_features), self.init, generator)
            self.tensors[name] = matrix = matrix.to(device)
            if self.init == "identity":
                self._identities[name] = (matrix, matrix._version)
        elif matrix.shape == (flattened_features, error_features) and flattened_features != point_features:
            raise ValueError(
                f"Feedback point {name!r} needs a {point_features}x{error_features} matrix, broadcast over its "
                f"positions, but {self.loaded_from or 'the feedback state'} holds a {tuple(matrix.shape)} one: one row "
                "per position and feature, as earlier grape_hf versions wrote for a sequence point under a "
                "per-example error (a classifier's logits). Its per-position rows have no broadcast equivalent, so it "
                "cannot be converted: start a fresh run, or finish that run with the grape_hf version that wrote it."
            )
        elif matrix.shape != (point_features, error_features) and self.loaded_from is not None:
            raise ValueError(
                f"Feedback point {name!r} needs a {point_features}x{error_features} matrix but {self.loaded_from} "
                f"holds a {tuple(matrix.shape)} one: that checkpoint was written for another model or error point. "
                "Resume from a checkpoint of this model and these settings, or start a fresh run."
            )
        elif matrix.shape != (point_features, error_features):
            raise ValueError(
                f"Feedback point {name!r} needs a {point_features}x{error_features} matrix but has "
                f"{tuple(matrix.shape)}: its features or the error's changed between steps (only a point's "
                "positions, under an error without them, may vary). Give the model inputs of a fixed size."
            )
        elif matrix.device != device:
            identity = self.is_identity(name)
            self.tensors[name] = matrix = matrix.to(device)
            if identity:
                self._identities[name] = (matrix, matrix._version)
        return matrix

    def project(self, name: str, error: torch.Tensor, point_shape: torch.Size, dtype: torch.dtype,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Feedback `B e` for point `name`.

        Args:
            error: (*lead, error_features), the error at the tap.
            point_shape: (*lead, *point_feature_dims), the shape of the point's tensor.
            dtype: the point's dtype (the feedback is computed in float32 and cast to it).
            positions: for a point that `broadcasts`, its `real_positions` (*lead, positions): `B e` goes
                to every position, times `position_weights`.
        Returns:
            (*point_shape) tensor.
        """
        matrix = self.tensors[name]
        flat = error.reshape(-1, error.shape[-1]).to(matrix.dtype)
        # `e I^T` is `e` exactly: identity feedback (DFA's skip-path Jacobian) costs no matmul and no copy. Several
        # points then get views of one tensor, as the inputs of an add get its one gradient under BP.
        feedback = flat if self.is_identity(name) else flat @ matrix.T
        if positions is None:
            return feedback.to(dtype).reshape(point_shape)
        weights = position_weights(positions.to(feedback.device))
        feedback = feedback.reshape(*error.shape[:-1], 1, matrix.shape[0]) * weights.unsqueeze(-1)
        return feedback.to(dtype).reshape(point_shape)

    def is_identity(self, name: str) -> bool:
        """Whether point `name`'s matrix is known to be exactly the identity: the very tensor drawn by
        `init='identity'` or loaded equal to I, not written into since (`Tensor._version`). A matrix replaced (GrAPE's
        updates) or changed in place is not, without comparing values at every step (a device sync on GPUs)."""
        known = self._identities.get(name)
        matrix = self.tensors.get(name)
        return known is not None and known[0] is matrix and known[1] == matrix._version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The matrices by point name, each (point_features, error_features); points not yet run have none."""
        return dict(self.tensors)

    @staticmethod
    def check(tensors: dict[str, torch.Tensor], source: str | None = None) -> None:
        """Raise a `ValueError` naming the entry (`matrices.<name>`) and `source` for the first of
        `tensors` that is no feedback matrix (`matrix_problem`); changes nothing."""
        for name, matrix in tensors.items():
            problem = matrix_problem(matrix)
            if problem is not None:
                raise ValueError(
                    f"Feedback matrix 'matrices.{name}' in {source or 'the feedback state'} {problem}: resuming from "
                    "it would train with broken feedback. Resume from another checkpoint of this run, or start a fresh "
                    "run."
                )

    def load_state_dict(self, tensors: dict[str, torch.Tensor], source: str | None = None) -> None:
        """Replace every matrix by `tensors` (point name -> (point_features, error_features)), after
        `check` (float32, finite, not all zeros; nothing is replaced when one fails). They move to
        the model's device on first use, where `get` checks their shapes against the model's points
        and names `source` (the file they came from) if one does not fit."""
        self.check(tensors, source)
        self.tensors = dict(tensors)
        self.loaded_from = source
        self._identities = {name: (matrix, matrix._version) for name, matrix in self.tensors.items()
                            if matrix.shape[0] == matrix.shape[1]
                            and torch.equal(matrix, torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device))}
