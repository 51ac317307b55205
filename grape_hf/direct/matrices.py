"""The feedback matrices `B_k`: one per feedback point, created on first use, seeded per point.

`B_k` has shape (point_features, error_features): it maps the error's features to the point's
features, the leading (batch, sequence) dimensions being shared (ARCHITECTURE.md). So the
feedback of point k is `e @ B_k.T`, an estimate of the true `J_k^T e` with `J_k = dz/dh_k`.
The matrices live here, never in the model, so a trained model stays a plain checkpoint.
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

    def get(self, name: str, point_features: int, error_features: int, device: torch.device) -> torch.Tensor:
        """The matrix of point `name`, (point_features, error_features), created on first use.

        Raises when a point's shape changes between steps (e.g. a sequence-length-dependent point
        under a per-sequence error), which would silently need a different matrix.
        """
        matrix = self.tensors.get(name)
        if matrix is None:
            generator = torch.Generator().manual_seed(point_seed(self.seed, name))
            matrix = init_feedback_matrix((point_features, error_features), self.init, generator)
            self.tensors[name] = matrix = matrix.to(device)
        elif matrix.shape != (point_features, error_features) and self.loaded_from is not None:
            raise ValueError(
                f"Feedback point {name!r} needs a {point_features}x{error_features} matrix but {self.loaded_from} "
                f"holds a {tuple(matrix.shape)} one: that checkpoint was written for another model or error point. "
                "Resume from a checkpoint of this model and these settings, or start a fresh run."
            )
        elif matrix.shape != (point_features, error_features):
            raise ValueError(
                f"Feedback point {name!r} needs a {point_features}x{error_features} matrix but has "
                f"{tuple(matrix.shape)}: its features or the error's changed between steps. Pad inputs to a fixed "
                "shape, or read the error where it shares the point's leading dimensions (error_point='head_input')."
            )
        elif matrix.device != device:
            self.tensors[name] = matrix = matrix.to(device)
        return matrix

    def project(self, name: str, error: torch.Tensor, point_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Feedback `B e` for point `name`.

        Args:
            error: (*lead, error_features), the error at the tap.
            point_shape: (*lead, *point_feature_dims), the shape of the point's tensor.
            dtype: the point's dtype (the feedback is computed in float32 and cast to it).
        Returns:
            (*point_shape) tensor.
        """
        matrix = self.tensors[name]
        flat = error.reshape(-1, error.shape[-1]).to(matrix.dtype)
        return (flat @ matrix.T).to(dtype).reshape(point_shape)

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
