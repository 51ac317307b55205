"""The model card (README.md) written beside the weights on `save_model` and `push_to_hub`.

The Trainer's own card facts (metadata, hyperparameters, eval results and the training-results
table, all from `transformers.modelcard.TrainingSummary`) plus what grape_hf knows (the rule, the
setting, the feedback hyperparameters, the last logged alignment figures, the command line and
versions) are rendered into a template of `grape_hf/model_cards/` with `huggingface_hub.ModelCard`,
which also checks the metadata the Hub will read.
"""

import dataclasses
import importlib.metadata
import logging
import math
import os
import shlex
import sys
from pathlib import Path

import datasets
import huggingface_hub
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from transformers.modelcard import TrainingSummary, make_markdown_table
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .callbacks import PLOT_FILE

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "model_cards"
TASKS = {"causal_lm": "text-generation", "image_classification": "image-classification"}
CARD_NAME = "README.md"

RULE_TITLES = {
    "bp": "backpropagation (BP)",
    "dfa": "Direct Feedback Alignment (DFA, Nøkland 2016)",
    "grape": "GrAPE (Gradient-Aligned Projected Error: DFA with feedback aligned to forward-mode Jacobian estimates)",
    "fa": "Feedback Alignment (FA, Lillicrap et al. 2016)",
    "drtp": "Direct Random Target Projection (DRTP, Frenkel et al. 2021)",
    "pepita": "PEPITA (Dellaferrera & Kreiman 2022)",
    "mezo": "MeZO (zeroth-order SGD from two perturbed forwards, Malladi et al. 2023)",
    "fg": "forward gradient (weight-perturbed, from one forward-mode pass, Baydin et al. 2022)",
}
ALIGNMENT_PREFIXES = ("alignment", "true_alignment")
MASK = "***"  # what a card shows in place of a secret (a card may be public: `push_to_hub` uploads it)


def template_kind(model) -> str | None:
    """'image_classification' (input `pixel_values`), 'causal_lm' (a causal LM class), or None (no template)."""
    if getattr(model, "main_input_name", None) == "pixel_values":
        return "image_classification"
    name = type(model).__name__
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    return None


def peft_adapter(model) -> dict[str, object] | None:
    """What a card says of a PEFT model (`peft.PeftModel`, read without importing peft), or None for any other model:
    `method` (LoRA, DoRA, IA3, ...), `peft_type` (the config's, e.g. 'LORA'), `base_model` (the config's
    `base_model_name_or_path`: a Hub id or a local folder), `trainable` (the adapter's trainable parameters) and
    `base` (the wrapped transformers model)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs or not hasattr(model, "get_base_model"):
        return None
    config = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()))
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    method = "DoRA" if getattr(config, "use_dora", False) else {"LORA": "LoRA"}.get(peft_type, peft_type)
    return {"method": method, "peft_type": peft_type, "base_model": config.base_model_name_or_path,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "base": model.get_base_model()}


def feedback_hyperparameters(args) -> dict[str, object]:
    """The fields `GrapeTrainingArguments` adds to `TrainingArguments` that apply to `args.rule` (their
    metadata's "rules"), set ones only; 'bp' has no feedback, so none."""
    if args.rule == "bp":
        return {}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
            # rule and setting have their own rows; None means "resolved from the model" (shown apart)
            if args.rule in f.metadata.get("rules", ()) and f.name not in ("rule", "setting")
            and getattr(args, f.name) is not None}


def last_alignment(log_history: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """The last logged value of every `alignment/<point>` and `true_alignment/<point>`.

    Returns:
        (rows, steps): one row per point in logging order ("mean" last), `{"point": name,
        "alignment": float | None, "true_alignment": float | None}`, and for each prefix the step
        of its last log line.
    """
    values: dict[str, dict[str, float]] = {}
    steps: dict[str, int] = {}
    for entry in log_history:
        for key, value in entry.items():
            prefix, _, point = key.partition("/")
            if prefix in ALIGNMENT_PREFIXES and point:
                values.setdefault(point, {})[prefix] = value
                steps[prefix] = entry.get("step")
    order = [point for point in values if point != "mean"] + (["mean"] if "mean" in values else [])
    rows = [{"point": point, **{prefix: values[point].get(prefix) for prefix in ALIGNMENT_PREFIXES}} for point in order]
    return rows, steps


def secret_fields(args) -> list[str]:
    """The fields of `args` that hold a secret: every field named `*token` (`hub_token`; the Trainer's other
    fields with "token" in their name, `average_tokens_across_devices` and `include_num_input_tokens_seen`,
    are settings, not secrets)."""
    return [f.name for f in dataclasses.fields(args) if f.name.endswith("token")]


def secret_values(args) -> list[str]:
    """The secrets themselves: the value of every secret field, and the Hub token of the environment, which
    `push_to_hub` sends when `hub_token` is not set. (Not `huggingface_hub.get_token()`: in Colab it may ask
    the user for access to the notebook's secrets, on every checkpoint.)"""
    values = [getattr(args, name) for name in secret_fields(args)]
    values += [os.environ.get(name) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    return [value for value in values if isinstance(value, str) and value]


def is_secret_flag(flag: str, fields: list[str]) -> bool:
    """Whether argparse may read `flag` as one of `fields`: `HfArgumentParser` registers `--hub_token` and
    `--hub-token`, and argparse takes any unambiguous prefix of either (`--hub_tok`). Any prefix counts, even
    one ambiguous here (masking too much costs nothing; an ambiguous flag stops argparse anyway). A flag named
    `*token` counts too: a script's own dataclasses may have one (`--token`, `--hf-token`)."""
    if not flag.startswith("--") or len(flag) <= 2:
        return False
    name = flag[2:].replace("-", "_")
    return name.endswith("token") or any(field.startswith(name) for field in fields)


def is_secret_variable(word: str) -> bool:
    """Whether `word` sets a shell variable named like a token (`HF_TOKEN=...` before the command; not
    `TOKENIZERS_PARALLELISM=false`)."""
    name, equals, _ = word.partition("=")
    return bool(equals) and name.isidentifier() and name.upper().endswith("TOKEN")


def mask_secrets(args, words: list[str]) -> list[str]:
    """`words` (a command line, split) with every secret replaced by `MASK`: the value of every flag that
    argparse may read as a secret field (`--hub-token x`, `--hub_token=x`, `--hub_tok x`, ...), every
    token-named variable (`HF_TOKEN=x`), and every occurrence of a secret's value in any word (`--x=...`)."""
    fields, values = secret_fields(args), secret_values(args)
    masked = []
    value_follows = False  # the previous word was a secret flag without "=": this word is its value
    for word in words:
        flag, equals, _ = word.partition("=")
        if value_follows:
            word, value_follows = MASK, False
        elif is_secret_flag(flag, fields):
            if equals:
                word = f"{flag}={MASK}"
            else:
                value_follows = True
        elif is_secret_variable(word):
            word = f"{flag}={MASK}"
        for value in values:
            word = word.replace(value, MASK)
        masked.append(word)
    return masked


def command_line(args, argv: list[str] | None = None) -> str:
    """The command that started this process (`sys.argv`), as a shell line, with secrets masked
    (`mask_secrets`).

    A script (`*.py`) is prefixed with `python`, or with `accelerate launch --num_processes N` when
    several processes trained."""
    masked = mask_secrets(args, list(sys.argv if argv is None else argv))
    line = shlex.join(masked)
    if masked and masked[0].endswith(".py"):
        launcher = f"accelerate launch --num_processes {args.world_size}" if args.world_size > 1 else "python"
        line = f"{launcher} {line}"
    return line


def masked_command(args, command: str) -> str:
    """A command given as one string (`create_model_card(command=...)`), with secrets masked as in
    `command_line`; unchanged when it holds none. A string the shell could not split (an open quote) is
    split at whitespace instead, so that its secrets are still found."""
    for value in secret_values(args):
        command = command.replace(value, MASK)
    try:
        words, join = shlex.split(command), shlex.join
    except ValueError:
        words, join = command.split(), " ".join
    masked = mask_secrets(args, words)
    return command if masked == words else join(masked)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def render_model_card(trainer, output_dir: str | None = None, command: str | None = None,
                      **summary_kwargs) -> ModelCard | None:
    """The card of `trainer`'s model and run, or None (with a warning) for a model with no template.

    Args:
        trainer: a `GrapeTrainer` (its args, model, feedback and `state.log_history` are read).
        output_dir: where the card goes (default `args.output_dir`); it shows the alignment plot found there.
        command: how the run was started; default: this process's `sys.argv` (see `command_line`). Secrets
            are masked in either (`mask_secrets`).
        **summary_kwargs: `Trainer.create_model_card`'s arguments (`model_name`, `dataset`,
            `dataset_tags`, `dataset_args`, `tags`, `tasks`, `language`, `license`, `finetuned_from`).
            `dataset` is the data set really used, in words (e.g. a fallback); `dataset_tags` its Hub
            id, only when the Hub data set itself was used.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = peft_adapter(model)
    if adapter is not None:  # the card describes the base model, the adapter and the rule
        model = adapter.pop("base")
    kind = template_kind(model)
    if kind is None:
        logger.warning(f"No grape_hf model card template for {type(model).__name__} (templates: causal LMs and "
                       "image classifiers); no README.md written.")
        return None
    args = trainer.args
    tags = summary_kwargs.pop("tags", None) or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    tags += [tag for tag in ("grape_hf", args.rule, "backpropagation-free" if args.rule != "bp" else None)
             if tag and tag not in tags]
    summary_kwargs.setdefault("tasks", TASKS[kind])
    summary_kwargs.setdefault("dataset_metadata", [])  # no guessed config/split ("None") in the Hub metadata
    if summary_kwargs.get("dataset_tags") is None:
        # Never guess the data set from the `datasets` builder: a fallback would be named as the Hub data set.
        summary_kwargs.update(dataset_tags=[], dataset_args=[])
    summary = TrainingSummary.from_trainer(trainer, tags=tags, **summary_kwargs)
    metadata = summary.create_metadata()
    metadata["pipeline_tag"] = TASKS[kind]
    if adapter is not None:  # as PEFT's own cards: the Hub lists the adapter under its base model
        base = adapter["base_model"]
        metadata["library_name"] = "peft"
        metadata["tags"] = [*metadata.get("tags", []), adapter["peft_type"].lower()]
        if base and not os.path.isdir(base):  # a Hub id, not a local folder
            metadata["base_model"] = base
            metadata["tags"].append(f"base_model:adapter:{base}")

    eval_results = summary.eval_results or {}
    train_losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    alignment, alignment_steps = last_alignment(trainer.state.log_history)
    feedback = trainer.feedback
    template_vars = dict(
        model_name=summary.model_name,
        repo_id=getattr(trainer, "hub_model_id", None) or args.hub_model_id or summary.model_name,
        model_class=type(model).__name__,
        grape_hf_model=type(model).__module__.startswith("grape_hf"),
        num_parameters=model.num_parameters(),
        has_processor=trainer.processing_class is not None,
        finetuned_from=summary.finetuned_from or None,
        adapter=adapter,
        dataset=_as_text(summary.dataset),
        rule=args.rule,
        rule_title=RULE_TITLES.get(args.rule, args.rule),
        setting=args.setting,
        points=list(feedback.point_names) if feedback is not None else [],
        # points whose segments hold no trainable parameter (a frozen base under PEFT adapters): cut, no feedback
        frozen_points=list(getattr(getattr(feedback, "placement", None), "frozen", ())),
        error_point=feedback.error_point if feedback is not None else None,
        head=feedback.head if feedback is not None else None,
        feedback_hyperparameters=feedback_hyperparameters(args),
        setting_origins=feedback.settings.origins if feedback is not None else {},
        settings_description=feedback.settings.describe() if feedback is not None else None,
        hyperparameters=summary.hyperparameters,
        global_step=trainer.state.global_step,
        train_loss=train_losses[-1] if train_losses else None,
        eval_results=eval_results,
        perplexity=_perplexity(eval_results.get("Loss")) if kind == "causal_lm" else None,
        results_table=make_markdown_table(summary.eval_lines) if summary.eval_lines else "",
        alignment=alignment,
        alignment_steps=alignment_steps,
        alignment_plot=PLOT_FILE if os.path.isfile(os.path.join(output_dir or args.output_dir, PLOT_FILE)) else None,
        command=masked_command(args, command) if command is not None else command_line(args),
        versions={"grape_hf": _version("grape_hf"), "Transformers": transformers.__version__,
                  "PyTorch": torch.__version__, "Datasets": datasets.__version__,
                  "huggingface_hub": huggingface_hub.__version__},
    )
    return ModelCard.from_template(ModelCardData(**metadata), template_path=TEMPLATE_DIR / f"{kind}.md",
                                   **template_vars)


def write_model_card(trainer, output_dir: str, **kwargs) -> str | None:
    """Render the card (see `render_model_card`) and save it as `output_dir/README.md`; returns its path."""
    card = render_model_card(trainer, output_dir, **kwargs)
    if card is None:
        return None
    path = os.path.join(output_dir, CARD_NAME)
    os.makedirs(output_dir, exist_ok=True)
    card.save(path)
    return path


def _as_text(dataset) -> str | None:
    if not dataset:
        return None
    return dataset if isinstance(dataset, str) else "; ".join(str(name) for name in dataset)


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
