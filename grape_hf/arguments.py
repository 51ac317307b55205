"""`GrapeTrainingArguments`: `TrainingArguments` plus the learning rule and where its feedback goes.

Every field is a command-line flag through `HfArgumentParser` (`--rule dfa --setting micro`).
"""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .rules import RULES

SETTINGS = ("macro", "micro")
FEEDBACK_INITS = ("normal", "uniform", "kaiming_uniform")
ERROR_POINTS = ("head_input", "logits")


def check_choice(name: str, value, choices) -> None:
    """Raise a `ValueError` naming the field, the bad value and the valid values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


@dataclass
class GrapeTrainingArguments(TrainingArguments):
    """Arguments of `GrapeTrainer`: every `TrainingArguments` field, plus the rule's."""

    rule: str = field(
        default="dfa",
        metadata={"help": "Learning rule: 'bp' (stock backpropagation) or 'dfa' (Direct Feedback Alignment).",
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

    def __post_init__(self):
        super().__post_init__()
        check_choice("rule", self.rule, tuple(RULES))
        check_choice("setting", self.setting, SETTINGS)
        check_choice("feedback_init", self.feedback_init, FEEDBACK_INITS)
        if self.error_point is not None:
            check_choice("error_point", self.error_point, ERROR_POINTS)
        if self.feedback_seed is None:
            self.feedback_seed = self.seed
        if self.rule != "bp" and (self.activation_checkpointing or self.gradient_checkpointing):
            raise ValueError(
                f"activation (gradient) checkpointing does not work with rule={self.rule!r}: recomputing a block "
                "runs its feedback hooks twice. Turn activation_checkpointing off."
            )
