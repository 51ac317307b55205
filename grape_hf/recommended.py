"""The settings each rule learns best with, by kind of model: one table, measured by the benchmarks.

The fields of `RECOMMENDED_FIELDS` default to None ("unset") in `GrapeTrainingArguments`. When a rule is
installed on a model (`Rule.__init__`), `resolve_settings` fills every unset field from the table row of the
model's kind (`model_kind`): a causal LM read on its residual stream, trained from scratch, fine-tuned in
full from a pretrained checkpoint, or through PEFT adapters; an MLP or CNN of `grape_hf.models`; a ViT. A
value the user gave always wins. A rule without a row for the model's kind takes the paper's values
(`PAPER_VALUES`) and says so in a warning, instead of guessing. Every entry names the benchmark and the
figure it comes from.

A rule's published regime may need what no feedback field sets (DRTP's tanh units and SGD, PEPITA's one
hidden layer): `REGIMES` holds those Trainer fields and model-config values; the rule says once, at install,
where a run differs from them, and the example scripts apply them where the user passed nothing.
"""

import copy
import dataclasses
import logging
import sys

logger = logging.getLogger(__name__)

RECOMMENDED_FIELDS = ("feedback_init", "block_lr_scale", "grape_lr", "grape_smoothing", "grape_track_scale",
                      "grape_estimate_stride")

# The paper's setting (GrAPE paper section 4): random normal feedback, one learning rate, feedback SGD 1e-3,
# no smoothing, constant matrix norm, the estimate on the whole batch. Taken where the table has no entry.
PAPER_VALUES = {"feedback_init": "normal", "block_lr_scale": 1.0, "grape_lr": 1e-3, "grape_smoothing": "none",
                "grape_track_scale": False, "grape_estimate_stride": 1}

KIND_TITLES = {
    "causal_lm": "a causal LM, error read on its residual stream",
    "mlp_cnn": "an MLP or CNN of grape_hf.models",
    "vit": "a ViT",
    "other": "a model of no measured kind",
}
TRAINING_TITLES = {"scratch": "trained from scratch", "pretrained": "fine-tuned in full from a pretrained checkpoint",
                   "adapters": "fine-tuned through PEFT adapters"}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One cell of the table: the values of some of `RECOMMENDED_FIELDS`, and where they were measured."""

    values: dict
    source: str


@dataclasses.dataclass(frozen=True)
class Regime:
    """A rule's published regime, beyond the feedback fields: `trainer` (TrainingArguments fields) and `model`
    (config fields of the model), with its source and what it measured against the run's defaults."""

    trainer: dict
    model: dict
    source: str


LM_FIDELITY = "benchmarks/lm_fidelity.py (3 x 96 GPT-2, embedded corpus, 1500 steps, seed 0)"
FINETUNE = ("benchmarks/finetune.py (byte-level 4 x 128 GPT-2 pretrained by BP on the embedded corpus, 200 steps on "
            "the Python standard library's source, seed 0)")
VISION = "benchmarks/vision_fidelity.py (MNIST, 150 steps of batch 64, seed 0)"

# GrAPE on a causal LM estimates on every STRIDE_LM-th row of each batch, in a forward of its own (measured below).
STRIDE_LM = 8
STRIDE_NOTE = ("every 8th row: 4.265 macro / 4.275 micro against 4.262 / 4.267 on the whole batch, at 1.09-1.18 x "
               "BP's CPU time per step instead of 1.29-1.31 x (benchmarks/step_time.py --trainer_loop, GPT-2 4 x 256, "
               "two runs)")

# (model kind, training) -> rule -> Entry.
TABLE: dict[tuple[str, str], dict[str, Entry]] = {
    ("causal_lm", "scratch"): {
        "dfa": Entry(
            {"feedback_init": "identity", "block_lr_scale": 0.3},
            f"{LM_FIDELITY}: eval loss 4.323 macro / 4.361 micro against 5.064 with the blocks frozen, 4.688 for the "
            "paper's random feedback at its best block scale, unigram 5.852; blocks at 0.03 / 0.1 / 0.3 / 1 x: macro "
            "4.52 / 4.39 / 4.32 / 4.31, micro 4.53 / 4.42 / 4.36 / 4.73. On a second corpus (4 x 128, 600 steps, "
            "cosine): 2.290 against 2.810 frozen and 3.047 unigram"),
        "grape": Entry(
            {"feedback_init": "identity", "block_lr_scale": 0.3, "grape_lr": 0.1, "grape_smoothing": "ema",
             "grape_track_scale": True, "grape_estimate_stride": STRIDE_LM},
            f"{LM_FIDELITY}, only --rule: 4.262 macro / 4.267 micro (identity DFA 4.323 / 4.361, BP 4.112): 29 / 38 % "
            "of the identity-DFA-to-BP gap, 83 % of the linear-feedback oracle's share (macro, "
            "benchmarks/linear_feedback_ceiling.py); the earlier recommendation (random init, blocks at 0.1 x, no "
            "scale tracking) 4.280 / 4.284. On a second corpus (4 x 128, 600 steps, cosine): blocks at 0.3 x, "
            "identity init 2.257, 0.1 x 2.278 (identity DFA 2.290). The estimate on " + STRIDE_NOTE),
    },
    ("causal_lm", "pretrained"): {
        "dfa": Entry(
            {"feedback_init": "identity", "block_lr_scale": 2.0},
            f"{FINETUNE}, full fine-tuning: 70 % of the way from head-only to BP (seed 1: 67 %); blocks at 0.3 / 1 / 2 / "
            "3 / 10 x: 2.255 / 2.172 / 2.131 / 2.136 / 2.224 (head only 2.341, BP 2.039); random feedback 2.70, "
            "worse than training the head alone"),
        "grape": Entry(
            {"feedback_init": "identity", "block_lr_scale": 2.0, "grape_lr": 0.01, "grape_smoothing": "ema",
             "grape_track_scale": False, "grape_estimate_stride": 1},
            f"{FINETUNE}, full fine-tuning: 71 % of the way from head-only to BP (seed 1: 70 %), at or below DFA on "
            "both seeds; grape_lr 0.003 / 0.01 / 0.1: 2.127 / 2.128 / 2.152; random init diverges (3.63); scale "
            "tracking no change; the estimate on the whole batch (every N-th row not measured on fine-tuning)"),
    },
    ("causal_lm", "adapters"): {
        "dfa": Entry(
            {"feedback_init": "identity", "block_lr_scale": 3.0},
            f"{FINETUNE}, LoRA r 8 on c_attn and c_fc: 100 % of the way from the pretrained model to BP LoRA (seed 1: "
            "99 %); adapters at 1 x: 2.624 against 2.531 at 3 x (BP LoRA 2.530); random feedback climbs (4.43 -> "
            "4.47)"),
        "grape": Entry(
            {"feedback_init": "identity", "block_lr_scale": 3.0, "grape_lr": 0.01, "grape_smoothing": "ema",
             "grape_track_scale": False, "grape_estimate_stride": 1},
            f"{FINETUNE}, LoRA r 8: 101 % of the way from the pretrained model to BP LoRA on seeds 0 and 1 (2.499 "
            "against BP LoRA's 2.530, DFA 2.531); the estimate on the whole batch (a part not measured here)"),
    },
    ("mlp_cnn", "scratch"): {
        **{rule: Entry({"feedback_init": "normal", "block_lr_scale": 1.0},
                       f"{VISION}: the MLP at Adam 1e-4 (the paper's and the example's lr), DFA 83.0 % with the blocks "
                       "at 1 x against 74.1 % at 0.3 x and 61.8 % at 0.03 x (BP 89.8 %, output layer alone 72.7 % at "
                       "3e-4); smaller block scales win only with a 100 x larger lr (0.03 x at 1e-2: 86.2 %)")
           for rule in ("dfa", "drtp", "fa")},
        "pepita": Entry({"feedback_init": "normal"},
                        "F is drawn and rescaled to pepita_f_scale (the papers' 0.05): its distribution hardly matters; "
                        "PEPITA learns in its published regime (REGIMES)"),
        "grape": Entry(
            {"feedback_init": "normal", "block_lr_scale": 1.0, "grape_lr": 0.1, "grape_smoothing": "none",
             "grape_track_scale": False, "grape_estimate_stride": 1},
            f"{VISION}: the MLP at Adam 1e-4, GrAPE 88.5 % with grape_lr 0.1 against 85.4 % at 1e-2 and 83.5 % at "
            "1e-3 (DFA 83.0 %, BP 89.8 %); EMA smoothing 88.2 %, scale tracking 88.2 %; on the CNN grape_lr 0.1 is "
            "also the best, and GrAPE (92.3 %) beats DFA (87.9 %). The estimate on the whole batch: on every 4th image "
            "(16 of 64) the MLP ends at 87.6 % against 88.6 % and the CNN (at lr 1e-4) at 66.0 % against 68.2 %"),
    },
}

# DRTP's regime (Frenkel et al. 2021's reference code), the same on the MLP and the CNN.
DRTP_REGIME = dict(trainer={"optim": "sgd", "optim_args": "momentum=0.9,nesterov=True", "learning_rate": 0.05},
                   model={"hidden_act": "tanh"})

# (config model_type, rule) -> the rule's published regime on that model (benchmarks/reproduce_table1.py's
# OWN_SETTINGS add only what reproducing the paper's table needs: epochs, batch, decay).
REGIMES: dict[tuple[str, str], Regime] = {
    ("grape_mlp", "drtp"): Regime(
        **DRTP_REGIME,
        source="Frenkel et al. 2021's reference code (tanh units, SGD Nesterov); MNIST MLP, 150 steps of 64 "
               "(benchmarks/vision_fidelity.py): 87.8 % in it, at most 36 % with Adam (every lr from 1e-4 to 3e-2, "
               "every block scale) and ReLU units; both parts are needed (tanh alone 63.1 %, SGD alone 9.3 %)"),
    ("grape_cnn", "drtp"): Regime(
        **DRTP_REGIME,
        source="the regime of DRTP's MLP, measured on the LeNet-4 CNN (benchmarks/vision_fidelity.py, 150 steps of "
               "64): 89.8 % in it, 71.9 % at best with Adam and ReLU units (tanh alone 20.4 %, SGD alone 10.1 %)"),
    ("grape_mlp", "pepita"): Regime(
        trainer={"optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.01, "weight_decay": 1e-4},
        model={"num_hidden_layers": 1},
        source="Srinivasan et al. 2023's setting (one hidden layer, SGD momentum 0.9, lr 0.01); MNIST MLP, 150 "
               "steps of 64 (benchmarks/vision_fidelity.py): 88.7 % in it, at most 42.3 % with Adam on 3 x 1024 "
               "(one hidden layer alone, with Adam: 82.0 %)"),
}


def applicable_fields(rule: str, args) -> tuple[str, ...]:
    """The `RECOMMENDED_FIELDS` that apply to `rule` (their metadata's "rules")."""
    rules = {f.name: f.metadata.get("rules", ()) for f in dataclasses.fields(args)}
    return tuple(name for name in RECOMMENDED_FIELDS if rule in rules[name])


def peft_base(model):
    """The model inside a PEFT wrapper (`PeftModel.get_base_model()`), or None when `model` is not one."""
    peft = sys.modules.get("peft")  # no PEFT model can exist unless peft was imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return None


def model_kind(model, args) -> tuple[str, str]:
    """(kind, training) of `model` for the table.

    kind: 'causal_lm' (a causal LM whose error is read on its residual stream, the causal-LM default),
    'mlp_cnn' (a model of `grape_hf.models` that declares its feedback points: MLP, CNN, VGG, ResNet),
    'vit' (config `model_type` 'vit'), else 'other'. training: 'adapters' (a PEFT model), 'pretrained'
    (`args.pretrained`, or when unset, a model with a `name_or_path`: loaded with `from_pretrained`), else
    'scratch'.
    """
    from .direct.placement import DECLARED_POINTS, default_error_point, find_blocks
    from .model_card import template_kind

    base = peft_base(model)
    inner = model if base is None else base
    if template_kind(inner) == "causal_lm" and args.error_point in (None, "residual") and (
            args.error_point == "residual" or default_error_point(inner, find_blocks(inner)) == "residual"):
        kind = "causal_lm"
    elif getattr(inner, DECLARED_POINTS, None):
        kind = "mlp_cnn"
    elif getattr(getattr(inner, "config", None), "model_type", None) == "vit":
        kind = "vit"
    else:
        kind = "other"
    if base is not None:
        return kind, "adapters"
    pretrained = args.pretrained if args.pretrained is not None else bool(getattr(inner, "name_or_path", ""))
    return kind, "pretrained" if pretrained else "scratch"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a rule runs with: the table's fields resolved for one model.

    Attributes:
        rule, kind, training: the rule and the model's kind (`model_kind`).
        values: every applicable `RECOMMENDED_FIELDS` field -> the value this run uses.
        origins: field -> 'given' (by the user), 'recommended' (the table) or 'paper' (no entry: `PAPER_VALUES`).
        source: the table entry's source, or None when it has no entry for this rule and kind.
    """

    rule: str
    kind: str
    training: str
    values: dict
    origins: dict
    source: str | None

    def as_dict(self) -> dict:
        """JSON-ready: for `run_info.json`, the checkpoint header and the model card."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One paragraph: the model's kind, each value with its origin, the source."""
        values = ", ".join(f"{name}={value!r} ({self.origins[name]})" for name, value in self.values.items())
        text = (f"rule {self.rule!r} on {KIND_TITLES[self.kind]}, {TRAINING_TITLES[self.training]}: "
                f"{values or 'no recommended fields'}")
        return text + (f". Source: {self.source}." if self.source and "recommended" in self.origins.values() else ".")


def resolve_settings(model, args):
    """(resolved args, `Settings`): a shallow copy of `args` whose unset `RECOMMENDED_FIELDS` hold the values
    this rule uses on `model`; `args` itself is not changed. Logs the settings once (info) and warns when a
    field had no table entry to come from, or when the run differs from the rule's published regime."""
    kind, training = model_kind(model, args)
    entry = TABLE.get((kind, training), {}).get(args.rule)
    values, origins = {}, {}
    for name in applicable_fields(args.rule, args):
        given = getattr(args, name)
        if given is not None:
            values[name], origins[name] = given, "given"
        elif entry is not None and name in entry.values:
            values[name], origins[name] = entry.values[name], "recommended"
        else:
            values[name], origins[name] = PAPER_VALUES[name], "paper"
    resolved = copy.copy(args)
    for name in RECOMMENDED_FIELDS:  # fields of other rules too, so that no code ever reads None
        setattr(resolved, name, values.get(name, getattr(args, name) if getattr(args, name) is not None
                                           else PAPER_VALUES[name]))
    if resolved.grape_update_steps > 1 and resolved.grape_smoothing == "none":
        raise ValueError("grape_update_steps > 1 updates the feedback from smoothed estimates between estimates: set "
                         "grape_smoothing to 'cma' or 'ema'.")
    settings = Settings(args.rule, kind, training, values, origins, entry.source if entry else None)
    logger.info("grape_hf settings: %s", settings.describe())
    unset = [name for name, origin in origins.items() if origin == "paper"]
    if unset and args.rule != "bp":
        logger.warning(
            "No measured recommendation for rule %r on %s, %s: %s take the paper's values (%s). Set them yourself, "
            "or measure them (benchmarks/lm_fidelity.py, benchmarks/vision_fidelity.py, benchmarks/finetune.py).",
            args.rule, KIND_TITLES[kind], TRAINING_TITLES[training], ", ".join(unset),
            ", ".join(f"{name}={PAPER_VALUES[name]!r}" for name in unset))
    warn_off_regime(model, resolved)
    return resolved, settings


def model_config(model):
    """The config of `model`, or of the model inside its PEFT wrapper; None when it has none."""
    return getattr(peft_base(model) or model, "config", None)


def regime_of(model, rule: str) -> Regime | None:
    """The published regime of `rule` on `model` (`REGIMES`, by its config's `model_type`), or None."""
    return REGIMES.get((getattr(model_config(model), "model_type", None), rule))


def regime_differences(regime: Regime, model, args) -> dict[str, tuple]:
    """field -> (this run's value, the regime's) where the run (`args`, `model`'s config) differs from `regime`."""
    config = model_config(model)
    found = {name: (getattr(args, name, None), value) for name, value in regime.trainer.items()}
    found.update({name: (getattr(config, name, None), value) for name, value in regime.model.items()})
    found = {name: (getattr(mine, "value", mine), theirs) for name, (mine, theirs) in found.items()}  # enums: values
    return {name: (mine, theirs) for name, (mine, theirs) in found.items() if str(mine) != str(theirs)}


def warn_off_regime(model, args) -> None:
    """Warn once when the run differs from its rule's published regime (`regime_of`), naming the flags that set
    it."""
    regime = regime_of(model, args.rule)
    differences = regime_differences(regime, model, args) if regime is not None else {}
    if not differences:
        return
    listed = "; ".join(f"{name}={theirs!r} (this run: {mine!r})" for name, (mine, theirs) in differences.items())
    logger.warning(
        "Rule %r learns in its published regime, which this run leaves: %s. Trainer fields are flags (--optim, "
        "--learning_rate, ...); the model's are config fields (build_image_model(..., %s), or --config_overrides in "
        "examples/run_image_classification.py, which applies the whole regime when you pass none of it). %s.",
        args.rule, listed, ", ".join(f"{k}={v!r}" for k, v in regime.model.items()), regime.source)
