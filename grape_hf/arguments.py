"""`GrapeTrainingArguments`: `TrainingArguments` plus the learning rule and where its feedback goes.

Every field is a command-line flag through `HfArgumentParser` (`--rule dfa --setting micro`).
Each field's metadata names the rules it applies to (`"rules"`): the model card shows a run's
fields for its rule only. GrAPE's own fields start with `grape_`, PEPITA's with `pepita_`.
"""

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from transformers import TrainingArguments

RULE_NAMES = ("bp", "dfa", "grape", "fa", "drtp", "pepita", "mezo", "fg")
FEEDBACK_RULES = RULE_NAMES[1:]  # every rule but bp
MATRIX_RULES = ("dfa", "grape", "fa", "drtp", "pepita")  # the rules with random feedback matrices (not mezo, fg)
DIRECT_RULES = ("dfa", "grape", "drtp")  # one error projected to feedback points (grape_hf.direct)
SETTINGS = ("macro", "micro")
FEEDBACK_INITS = ("normal", "uniform", "kaiming_uniform", "identity")
ERROR_POINTS = ("head_input", "logits", "residual")
ALIGNMENTS = ("frobenius", "columns")
SMOOTHINGS = ("none", "cma", "ema")
ESTIMATORS = ("outer", "residual")
# What an unset field of grape_hf.recommended.RECOMMENDED_FIELDS becomes (end of its help text).
RECOMMENDED = ("the value grape_hf.recommended's table measured best for the rule on this kind of model, chosen when "
               "the rule is installed (logged, and on trainer.feedback.settings).")

# Old name -> new name, accepted (with a FutureWarning) until grape_hf 0.3.
DEPRECATED_NAMES = {
    "feedback_lr": "grape_lr",
    "feedback_alignment": "grape_alignment",
    "feedback_smoothing": "grape_smoothing",
    "feedback_ema_decay": "grape_ema_decay",
    "feedback_update_steps": "grape_update_steps",
    "error_module": "head_module",
}


def check_choice(name: str, value, choices) -> None:
    """Raise a `ValueError` naming the field, the bad value and the valid values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def check_number(name: str, value, ok, valid: str, integer: bool = False):
    """`value` if it is a finite number (an integer when `integer`) for which `ok(value)` holds, else a
    `ValueError` naming the field, the bad value and what is valid (`valid`, e.g. "> 0").

    `HfArgumentParser` hands over numbers of the field's type, but Python callers and JSON/YAML files can pass
    anything: a string would fail later with a bare `TypeError`, inf would turn the feedback NaN, and a float
    step count would silently never match `step % n`. A bool is refused although Python counts it a number."""
    kind = "an integer" if integer else "a finite number"
    number_type = numbers.Integral if integer else numbers.Real
    # An int is always finite (and math.isfinite overflows on one too large for a float).
    if isinstance(value, bool) or not isinstance(value, number_type) or not (integer or math.isfinite(value)):
        raise ValueError(f"{name}={value!r} must be {kind} {valid}.")
    if not ok(value):
        raise ValueError(f"{name}={value!r} must be {valid}.")
    return int(value) if integer else float(value)


# The strings `HfArgumentParser` reads as a bool (its `string_to_bool`), so a Python caller or a JSON/YAML
# file gets the same meaning as the command line: "no" is False (a plain `bool("no")` is True).
BOOL_STRINGS = {"yes": True, "true": True, "t": True, "y": True, "1": True,
                "no": False, "false": False, "f": False, "n": False, "0": False}


def check_bool(name: str, value) -> bool:
    """`value` as a bool: a bool, or one of `BOOL_STRINGS` in any case; else a `ValueError`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in BOOL_STRINGS:
        return BOOL_STRINGS[value.lower()]
    raise ValueError(f"{name}={value!r} is not valid; give True or False (or one of the strings "
                     f"{', '.join(map(repr, BOOL_STRINGS))}).")


def check_names(name: str, value) -> list[str] | None:
    """`value` as a list of non-empty strings (one string becomes a one-element list), or None; else a
    `ValueError`. A plain string would otherwise be read letter by letter, each letter a pattern."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{name}={value!r} is not valid; give a list of module names (non-empty strings) such "
                         f"as ['transformer.h.*.attn', 'transformer.h.*.mlp'], or one such string.")
    return list(value)


class FieldMetadata(Mapping):
    """Field metadata with the rules a field applies to: `metadata["rules"]`. `HfArgumentParser` hands
    every key it iterates to `argparse.add_argument`, so "rules" is readable but not iterated."""

    def __init__(self, rules: tuple[str, ...], **argparse_kwargs):
        self._rules = rules
        self._kwargs = argparse_kwargs

    def __getitem__(self, key):
        return self._rules if key == "rules" else self._kwargs[key]

    def __iter__(self):
        return iter(self._kwargs)

    def __len__(self) -> int:
        return len(self._kwargs)


def rule_field(default, rules: tuple[str, ...], help: str, **argparse_kwargs):
    """A dataclass field that applies to `rules` (its metadata's "rules")."""
    return field(default=default, metadata=FieldMetadata(rules, help=help, **argparse_kwargs))


def deprecated_field(new: str):
    """The old name of field `new`: None unless given, then moved to `new` in `__post_init__`."""
    return field(default=None, metadata=FieldMetadata((), help=f"Deprecated: use --{new} (goes in grape_hf 0.3)."))


@dataclass
class GrapeTrainingArguments(TrainingArguments):
    """Arguments of `GrapeTrainer`: every `TrainingArguments` field, plus the rule's, grouped by owner.

    The fields of `grape_hf.recommended.RECOMMENDED_FIELDS` (feedback_init, block_lr_scale, grape_lr,
    grape_smoothing, grape_track_scale, grape_estimate_stride) are None until the rule is installed on a model,
    which fills each unset one from the table of what the benchmarks measured best for that rule on that kind of
    model; a value given here always wins. The trainer's `args` and `trainer.feedback.args` hold the resolved
    values; this object keeps what was given."""

    # Every rule ------------------------------------------------------------------------------
    rule: str = rule_field(
        "dfa", FEEDBACK_RULES,
        "Learning rule: 'bp' (stock backpropagation), 'dfa' (Direct Feedback Alignment), 'grape' (DFA with feedback "
        "aligned to forward-mode Jacobian estimates), and the paper's baselines for MLPs/CNNs: 'fa' (Feedback "
        "Alignment: random B in place of W^T, layer by layer), 'drtp' (DFA projecting the one-hot target instead of "
        "the error; classifiers) and 'pepita' (a second forward on the error-modulated input; MLPs only); 'mezo' "
        "(zeroth-order SGD from two perturbed forwards, the fine-tuning baseline of Malladi et al. 2023); 'fg' (the "
        "weight-perturbed forward gradient of Baydin et al. 2022: the loss's directional derivative along a random "
        "direction, from one forward-mode pass).",
        choices=list(RULE_NAMES))
    feedback_init: str | None = rule_field(
        None, MATRIX_RULES,
        "Distribution of the random feedback matrices: 'normal' or 'uniform' (variance 1/error_features), or "
        "'kaiming_uniform' (He uniform, variance 2/error_features), or 'identity' (B_k = I: points as wide as the "
        "error, e.g. on a pre-LN residual stream read with error_point='residual'). Unset: " + RECOMMENDED,
        choices=list(FEEDBACK_INITS))
    feedback_seed: int | None = rule_field(
        None, FEEDBACK_RULES,
        "Seed of the feedback matrices (default: `seed`). Same seed, same matrices on every process and every run.")
    pretrained: bool | None = rule_field(
        None, FEEDBACK_RULES,
        "Whether the model is a pretrained checkpoint being fine-tuned, which picks the recommended settings "
        "(grape_hf.recommended). Unset: a model with a name_or_path (loaded with from_pretrained) is; set False for "
        "a model built from a loaded config (from_config keeps the config's name).")
    bp_calibration_steps: int = rule_field(
        0, FEEDBACK_RULES,
        "Every N-th optimizer step is a true BP step on its batch (the GrAPE revision's calibration; 0: never).")

    # The direct rules (dfa, grape, drtp): where the points and the error tap go ----------------
    setting: str = rule_field(
        "macro", DIRECT_RULES, "Where feedback points go: 'macro' (one per block) or 'micro' (one per sub-layer: "
        "attention and MLP branch outputs).", choices=list(SETTINGS))
    error_point: str | None = rule_field(
        None, DIRECT_RULES,
        "Where the error is read: 'residual' (default for causal LMs: the input of the final norm, the residual "
        "stream itself, where DFA and GrAPE learn LMs best; the final norm then trains with the head by true BP; "
        "found after the blocks, or name it with head_module), 'head_input' (the input of the output head, as in "
        "Launay et al. 2020) or 'logits' (default for classifiers).")
    head_module: str | None = rule_field(
        None, (*DIRECT_RULES, "pepita"),
        "Name of the output head, around which the error tap sits (default: the model's output embeddings, or its "
        "`classifier`/`score`).")
    feedback_embeddings: bool = rule_field(
        True, DIRECT_RULES,
        "Put a feedback point after the embeddings. Off: the embedding output is cut, so the embeddings only train "
        "where they are tied to the output head.")
    feedback_modules: list[str] | None = rule_field(
        None, DIRECT_RULES,
        "Name the feedback-point modules yourself: names from model.named_modules(), where '*' stands for one dotted "
        "component ('transformer.h.*.attn'); overrides `setting`.")
    block_lr_scale: float | None = rule_field(
        None, DIRECT_RULES,
        "Learning-rate multiplier of the blocks' parameters (those only feedback reaches; the embeddings, the final "
        "norm and the head keep learning_rate): a block's step changes the Jacobians its feedback should follow, "
        "so the feedback rules learn language models only with slower blocks (docs: how-to/language-models). Applied as "
        "optimizer parameter groups, so every optimizer and scheduler of the Trainer works; 0 freezes the blocks. "
        "Unset: " + RECOMMENDED)
    alignment_probe_steps: int = rule_field(
        0, DIRECT_RULES,
        "Every N optimizer steps, log the true alignment: cos(B_k e, true dL/dh_k) per point, from one extra BP "
        "forward and backward on the current batch (0: off). Under DFA, also cos(B_k, T_k) with a Jacobian estimate.")

    parallel_backward: int = rule_field(
        0, DIRECT_RULES,
        "Layer-parallel backward: run the feedback segments' local backwards (independent once the error is known) "
        "on this many CPU threads at once, one intra-op thread each, instead of one after another (0: off). The same "
        "gradients; CPU and one process only; on 2 cores no faster than torch's own threads (docs: results/speed).")

    # GrAPE ------------------------------------------------------------------------------------
    grape_lr: float | None = rule_field(
        None, ("grape",),
        "SGD step size of the feedback update on 1 - cos(B, T), taken on the unit-norm matrix (or unit columns), so "
        "it is a rotation of about this many radians per step (the paper: 1e-3). Unset: " + RECOMMENDED)
    grape_alignment: str = rule_field(
        "frobenius", ("grape",),
        "'frobenius' (cosine of whole matrices, constant matrix norm: the paper's text) or 'columns' (per-column "
        "cosines, unit columns: the revised method). DFA's probe logs the same cosine.", choices=list(ALIGNMENTS))
    grape_smoothing: str | None = rule_field(
        None, ("grape",),
        "Average the Jacobian estimates over steps: 'none', 'cma' (cumulative moving average, as in the paper) or "
        "'ema' (exponential, decay `grape_ema_decay`). Unset: " + RECOMMENDED, choices=list(SMOOTHINGS))
    grape_ema_decay: float = rule_field(0.9, ("grape",), "Decay of the 'ema' smoothing.")
    grape_track_scale: bool | None = rule_field(
        None, ("grape",),
        "After each alignment step, give B_k (or each column, with grape_alignment='columns') the length of its "
        "smoothed target along its new direction, so it follows the Jacobian's scale as well as its direction "
        "(off: B_k keeps its initial norm, as in the paper). On the LM of benchmarks/lm_fidelity.py, 0.01 nats lower "
        "at every checkpoint over two seeds (docs: results/learning). Unset: " + RECOMMENDED)
    grape_estimator: str = rule_field(
        "outer", ("grape",),
        "How each Jacobian estimate is read from the forward tangent d = sum_j J_j u_j at the error: 'outer', "
        "T_k = mean(u_k d^T) (the paper's Algorithm 1), or 'residual', T_k = B_k + mean(u_k (d - sum_j u_j B_j)^T), "
        "the current feedback as a control variate: as unbiased, with noise from what the matrices still miss "
        "instead of from every point's whole Jacobian.", choices=list(ESTIMATORS))
    grape_estimate_stride: int | None = rule_field(
        None, ("grape",),
        "Estimate the Jacobians on every N-th row (sequence, image) of each batch: rows 0, N, 2N, ... 1: the training "
        "forward itself carries the tangents (about one extra forward). N > 1: a forward of those rows of its own, "
        "without autograd and stopped at the error tap, carries them (random state forked, buffers kept) and the "
        "training forward runs plain: cheaper (docs: results/speed), an estimate from fewer tokens. With a per-process "
        "batch divisible by N, several processes still train as one process of their whole batch. Unset: "
        + RECOMMENDED)
    grape_update_steps: int = rule_field(
        1, ("grape",),
        "Estimate the Jacobians every N-th optimizer step (the update in between uses the smoothed estimate; needs "
        "grape_smoothing when N > 1).")

    # PEPITA -----------------------------------------------------------------------------------
    pepita_f_scale: float = rule_field(
        0.05, ("pepita",),
        "The input feedback F (input_features x classes) has entries of standard deviation pepita_f_scale * "
        "sqrt(2 / input_features) (0.05 in Dellaferrera & Kreiman 2022 and Srinivasan et al. 2023; the latter add "
        "weight decay: use `weight_decay`).")
    pepita_mirror_lr: float = rule_field(
        0.0, ("pepita",),
        "Weight mirroring (Srinivasan et al. 2023): F becomes a product of one factor per layer, each turned towards "
        "W_l^T by this SGD step size on every training forward, then renormalised to F's scale (0: off, F fixed; "
        "they use 0.01).")
    pepita_mirror_weight_decay: float = rule_field(1e-4, ("pepita",), "Weight decay of the mirroring SGD step.")
    pepita_mirror_noise: float = rule_field(
        0.1, ("pepita",), "Standard deviation of the noise fed to each layer when mirroring.")

    # MeZO -------------------------------------------------------------------------------------
    mezo_eps: float = rule_field(
        1e-3, ("mezo",),
        "Scale of MeZO's perturbation: the loss is measured at theta + eps z and theta - eps z, z ~ N(0, I) per "
        "trainable parameter (1e-3 in Malladi et al. 2023). Too small and the loss difference drowns in rounding "
        "(bf16/fp16 forwards: keep it at 1e-3 or above); too large and it no longer measures the slope.")
    mezo_exact_restore: bool = rule_field(
        True, ("mezo",),
        "Restore the parameters after MeZO's two perturbed forwards from a copy of the trainable parameters, bit for "
        "bit (freed before the backward: without gradient accumulation the step's peak memory is unchanged). Off: "
        "restore in place as the paper's code does (theta += eps z, -= 2 eps z, += eps z), no copy, but a rounding "
        "drift of up to one unit in the last place per weight and step (~5e-8 of a float32 weight, ~2e-3 of a "
        "bf16 one).")

    # Old names, kept for one release ----------------------------------------------------------
    feedback_lr: float | None = deprecated_field("grape_lr")
    feedback_alignment: str | None = deprecated_field("grape_alignment")
    feedback_smoothing: str | None = deprecated_field("grape_smoothing")
    feedback_ema_decay: float | None = deprecated_field("grape_ema_decay")
    feedback_update_steps: int | None = deprecated_field("grape_update_steps")
    error_module: str | None = deprecated_field("head_module")

    def __post_init__(self):
        super().__post_init__()
        self._move_deprecated_names()
        check_choice("rule", self.rule, RULE_NAMES)
        check_choice("setting", self.setting, SETTINGS)
        if self.feedback_init is not None:
            check_choice("feedback_init", self.feedback_init, FEEDBACK_INITS)
        if self.error_point is not None:
            check_choice("error_point", self.error_point, ERROR_POINTS)
        check_choice("grape_alignment", self.grape_alignment, ALIGNMENTS)
        check_choice("grape_estimator", self.grape_estimator, ESTIMATORS)
        if self.grape_smoothing is not None:
            check_choice("grape_smoothing", self.grape_smoothing, SMOOTHINGS)
        self._check_types_and_ranges()
        if self.feedback_seed is None:
            self.feedback_seed = self.seed
        # MeZO's and fg's forwards run without autograd: nothing is recomputed, so checkpointing is harmless there
        if self.rule not in ("bp", "mezo", "fg") and (self.activation_checkpointing or self.gradient_checkpointing):
            raise ValueError(
                f"activation (gradient) checkpointing does not work with rule={self.rule!r}: recomputing a block "
                "runs its feedback hooks twice. Turn activation_checkpointing off."
            )

    def _check_types_and_ranges(self) -> None:
        """Check every number, bool and list this class adds (the Trainer's own fields are `TrainingArguments`'),
        converting what has one clear meaning (a bool string, a single module name)."""
        if self.grape_lr is not None:
            self.grape_lr = check_number("grape_lr", self.grape_lr, lambda v: v > 0, "> 0 (the paper uses 1e-3)")
        self.grape_ema_decay = check_number("grape_ema_decay", self.grape_ema_decay, lambda v: 0 < v < 1,
                                            "in (0, 1)")
        if self.grape_estimate_stride is not None:
            self.grape_estimate_stride = check_number("grape_estimate_stride", self.grape_estimate_stride,
                                                      lambda v: v >= 1, ">= 1 (1: the whole batch)", integer=True)
        self.grape_update_steps = check_number("grape_update_steps", self.grape_update_steps, lambda v: v >= 1,
                                               ">= 1", integer=True)
        if self.grape_update_steps > 1 and self.grape_smoothing == "none":  # unset: checked once resolved
            raise ValueError("grape_update_steps > 1 updates the feedback from smoothed estimates between "
                             "estimates: set grape_smoothing to 'cma' or 'ema'.")
        if self.block_lr_scale is not None:
            self.block_lr_scale = check_number("block_lr_scale", self.block_lr_scale, lambda v: v >= 0,
                                               ">= 0 (1: the blocks at learning_rate; 0: frozen)")
        self.alignment_probe_steps = check_number("alignment_probe_steps", self.alignment_probe_steps,
                                                  lambda v: v >= 0, ">= 0 (0: off)", integer=True)
        self.parallel_backward = check_number("parallel_backward", self.parallel_backward, lambda v: v >= 0,
                                              ">= 0 (0: off)", integer=True)
        self.bp_calibration_steps = check_number("bp_calibration_steps", self.bp_calibration_steps,
                                                 lambda v: v >= 0, ">= 0 (0: never)", integer=True)
        if self.feedback_seed is not None:
            self.feedback_seed = check_number("feedback_seed", self.feedback_seed, lambda v: True,
                                              "(or None: the Trainer's `seed`)", integer=True)
        self.pepita_f_scale = check_number("pepita_f_scale", self.pepita_f_scale, lambda v: v > 0,
                                           "> 0 (the papers use 0.05)")
        self.pepita_mirror_lr = check_number("pepita_mirror_lr", self.pepita_mirror_lr, lambda v: v >= 0,
                                             ">= 0 (0: off)")
        self.pepita_mirror_weight_decay = check_number("pepita_mirror_weight_decay", self.pepita_mirror_weight_decay,
                                                       lambda v: v >= 0, ">= 0")
        self.pepita_mirror_noise = check_number("pepita_mirror_noise", self.pepita_mirror_noise, lambda v: v > 0,
                                                "> 0")
        self.feedback_embeddings = check_bool("feedback_embeddings", self.feedback_embeddings)
        for name in ("grape_track_scale", "pretrained"):
            if getattr(self, name) is not None:
                setattr(self, name, check_bool(name, getattr(self, name)))
        self.feedback_modules = check_names("feedback_modules", self.feedback_modules)
        if self.head_module is not None and not (isinstance(self.head_module, str) and self.head_module):
            raise ValueError(f"head_module={self.head_module!r} is not valid; give a module name from "
                             "model.named_modules() such as 'lm_head', or None (found from the model).")
        self.mezo_eps = check_number("mezo_eps", self.mezo_eps, lambda v: v > 0, "> 0 (the paper uses 1e-3)")
        self.mezo_exact_restore = check_bool("mezo_exact_restore", self.mezo_exact_restore)

    def _move_deprecated_names(self) -> None:
        """Give each deprecated name's value to its new field, with a FutureWarning."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for old, new in DEPRECATED_NAMES.items():
            value = getattr(self, old)
            if value is None:
                continue
            if getattr(self, new) not in (defaults[new], value):
                raise ValueError(f"{old}={value!r} and {new}={getattr(self, new)!r} both given: {old} is the old name "
                                 f"of {new}; give only {new}.")
            warnings.warn(f"{old} is deprecated and goes in grape_hf 0.3: use {new}.", FutureWarning, stacklevel=3)
            setattr(self, new, value)
            setattr(self, old, None)
