"""`GrapeTrainingArguments`: `TrainingArguments` plus the learning rule and where its feedback goes.

Every field is a command-line flag through `HfArgumentParser` (`--rule dfa --setting micro`).
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .rules import RULES

SETTINGS = ("macro", "micro")
FEEDBACK_INITS = ("normal", "uniform", "kaiming_uniform")
ERROR_POINTS = ("head_input", "logits")
ALIGNMENTS = ("frobenius", "columns")
SMOOTHINGS = ("none", "cma", "ema")


def check_choice(name: str, value, choices) -> None:
    """Raise a `ValueError` naming the field, the bad value and the valid values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


@dataclass
class GrapeTrainingArguments(TrainingArguments):
    """Arguments of `GrapeTrainer`: every `TrainingArguments` field, plus the rule's."""

    rule: str = field(
        default="dfa",
        metadata={"help": "Learning rule: 'bp' (stock backpropagation), 'dfa' (Direct Feedback Alignment), "
                          "'grape' (DFA with feedback aligned to forward-mode Jacobian estimates), and the paper's "
                          "baselines for MLPs/CNNs: 'fa' (Feedback Alignment: random B in place of W^T, layer by "
                          "layer), 'drtp' (DFA projecting the one-hot target instead of the error; classifiers) and "
                          "'pepita' (a second forward on the error-modulated input; MLPs only).",
                  "choices": list(RULES)},
    )
    setting: str = field(
        default="macro",
        metadata={"help": "Where feedback points go: 'macro' (one per block) or 'micro' (one per sub-layer: "
                          "attention and MLP branch outputs).", "choices": list(SETTINGS)},
    )
    feedback_init: str = field(
        default="normal",
        metadata={"help": "Distribution of the random feedback matrices: 'normal' or 'uniform' (variance "
                          "1/error_features), or 'kaiming_uniform' (He uniform, variance 2/error_features).",
                  "choices": list(FEEDBACK_INITS)},
    )
    feedback_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the feedback matrices (default: `seed`). Same seed, same matrices on every "
                          "process and every run."},
    )
    error_point: str | None = field(
        default=None,
        metadata={"help": "Where the error is read: 'head_input' (the input of the output head; default for "
                          "causal LMs, as in Launay et al. 2020) or 'logits' (default for classifiers)."},
    )
    error_module: str | None = field(
        default=None,
        metadata={"help": "Name of the output-head module whose input or output is the error tap (default: the "
                          "model's output embeddings, or its `classifier`/`score`)."},
    )
    feedback_embeddings: bool = field(
        default=True,
        metadata={"help": "Put a feedback point after the embeddings. Off: the embedding output is cut, so the "
                          "embeddings only train where they are tied to the output head."},
    )
    feedback_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Name the feedback-point modules yourself: names from model.named_modules(), where "
                          "'*' stands for one dotted component ('transformer.h.*.attn'); overrides `setting`."},
    )

    feedback_lr: float = field(
        default=1e-3,
        metadata={"help": "GrAPE: SGD step size of the feedback update on 1 - cos(B, T), taken on the unit-norm "
                          "matrix (or unit columns), so it is a rotation of about this many radians per step."},
    )
    feedback_alignment: str = field(
        default="frobenius",
        metadata={"help": "GrAPE: 'frobenius' (cosine of whole matrices, constant matrix norm: the paper's text) or "
                          "'columns' (per-column cosines, unit columns: the revised method).",
                  "choices": list(ALIGNMENTS)},
    )
    feedback_smoothing: str = field(
        default="none",
        metadata={"help": "GrAPE: average the Jacobian estimates over steps: 'none', 'cma' (cumulative moving "
                          "average, as in the paper) or 'ema' (exponential, decay `feedback_ema_decay`).",
                  "choices": list(SMOOTHINGS)},
    )
    feedback_ema_decay: float = field(default=0.9, metadata={"help": "GrAPE: decay of the 'ema' smoothing."})
    feedback_update_steps: int = field(
        default=1,
        metadata={"help": "GrAPE: estimate the Jacobians every N-th optimizer step (the update in between uses the "
                          "smoothed estimate; needs feedback_smoothing when N > 1)."},
    )
    bp_calibration_steps: int = field(
        default=0,
        metadata={"help": "Every N-th optimizer step is a true BP step on its batch (the revision's calibration; "
                          "0: never)."},
    )

    pepita_f_scale: float = field(
        default=0.05,
        metadata={"help": "PEPITA: the input feedback F (input_features x classes) has entries of standard deviation "
                          "pepita_f_scale * sqrt(2 / input_features) (0.05 in Dellaferrera & Kreiman 2022 and "
                          "Srinivasan et al. 2023; the latter add weight decay: use `weight_decay`)."},
    )
    pepita_mirror_lr: float = field(
        default=0.0,
        metadata={"help": "PEPITA: weight mirroring (Srinivasan et al. 2023): F becomes a product of one factor per "
                          "layer, each turned towards W_l^T by this SGD step size on every training forward, then "
                          "renormalised to F's scale (0: off, F fixed; they use 0.01)."},
    )
    pepita_mirror_weight_decay: float = field(
        default=1e-4, metadata={"help": "PEPITA: weight decay of the mirroring SGD step."})
    pepita_mirror_noise: float = field(
        default=0.1, metadata={"help": "PEPITA: standard deviation of the noise fed to each layer when mirroring."})

    alignment_probe_steps: int = field(
        default=0,
        metadata={"help": "Every N optimizer steps, log the true alignment: cos(B_k e, true dL/dh_k) per point, from "
                          "one extra BP forward and backward on the current batch (0: off)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("rule", self.rule, tuple(RULES))
        check_choice("setting", self.setting, SETTINGS)
        check_choice("feedback_init", self.feedback_init, FEEDBACK_INITS)
        if self.error_point is not None:
            check_choice("error_point", self.error_point, ERROR_POINTS)
        check_choice("feedback_alignment", self.feedback_alignment, ALIGNMENTS)
        check_choice("feedback_smoothing", self.feedback_smoothing, SMOOTHINGS)
        if not self.feedback_lr > 0:
            raise ValueError(f"feedback_lr={self.feedback_lr} must be > 0 (the paper uses 1e-3).")
        if not 0 < self.feedback_ema_decay < 1:
            raise ValueError(f"feedback_ema_decay={self.feedback_ema_decay} must be in (0, 1).")
        if self.feedback_update_steps < 1:
            raise ValueError(f"feedback_update_steps={self.feedback_update_steps} must be >= 1.")
        if self.feedback_update_steps > 1 and self.feedback_smoothing == "none":
            raise ValueError("feedback_update_steps > 1 updates the feedback from smoothed estimates between "
                             "estimates: set feedback_smoothing to 'cma' or 'ema'.")
        if self.alignment_probe_steps < 0:
            raise ValueError(f"alignment_probe_steps={self.alignment_probe_steps} must be >= 0 (0: off).")
        if self.bp_calibration_steps < 0:
            raise ValueError(f"bp_calibration_steps={self.bp_calibration_steps} must be >= 0 (0: never).")
        if not self.pepita_f_scale > 0:
            raise ValueError(f"pepita_f_scale={self.pepita_f_scale} must be > 0 (the papers use 0.05).")
        if self.pepita_mirror_lr < 0 or self.pepita_mirror_weight_decay < 0 or not self.pepita_mirror_noise > 0:
            raise ValueError(f"PEPITA's mirroring needs pepita_mirror_lr >= 0 (0: off), pepita_mirror_weight_decay "
                             f">= 0 and pepita_mirror_noise > 0; got {self.pepita_mirror_lr}, "
                             f"{self.pepita_mirror_weight_decay} and {self.pepita_mirror_noise}.")
        if self.feedback_seed is None:
            self.feedback_seed = self.seed
        if self.rule != "bp" and (self.activation_checkpointing or self.gradient_checkpointing):
            raise ValueError(
                f"activation (gradient) checkpointing does not work with rule={self.rule!r}: recomputing a block "
                "runs its feedback hooks twice. Turn activation_checkpointing off."
            )
