"""What the example scripts share: argument parsing with script defaults and presets, and logging.

A script states its defaults (where they differ from `TrainingArguments`') and its presets, and
`parse_script_args` applies them under the rule that a value the user gave always wins: a flag
on the command line (`--name value`, `--name=value`, `--no_name`) or a key of the JSON file. A
default is also dropped when the user gave a flag it would override: `--save_steps N` without
`--save_strategy` means saving every N steps, whatever the preset's `save_strategy` says.
"""

import argparse
import dataclasses
import json
import logging
import sys

import datasets
import transformers
from transformers import HfArgumentParser

# A default for the key is dropped when the user gave one of the values' flags: they choose it.
IMPLIED_BY = {
    "save_strategy": ("save_steps",),
    "eval_strategy": ("eval_steps",),
    "logging_strategy": ("logging_steps",),
}


def explicit_flags(argv: list[str]) -> set[str]:
    """Names of the flags given on the command line: `--name value`, `--name=value`, `--no_name`."""
    names = set()
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            names.update({name, name.removeprefix("no_")})
    return names


# Fields whose chosen value decides other defaults (the preset; the rule and model, for a rule's published regime).
DECIDING = ("preset", "rule", "model")


def parse_script_args(dataclass_types: tuple, script_defaults: dict, presets: dict[str, dict],
                      argv: list[str] | None = None, chosen_defaults=None) -> tuple:
    """Parse `dataclass_types` (one of them has a `preset` field, one a `rule` field) from `argv` (default
    `sys.argv[1:]`) or from one JSON file, over `script_defaults`, `chosen_defaults(chosen)` (a function of
    the values chosen for the `DECIDING` fields the dataclasses have, e.g. {'rule': 'drtp', 'model': 'mlp'},
    returning defaults) and the chosen preset's values."""
    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    deciding = {f.name: f.default for t in dataclass_types for f in dataclasses.fields(t) if f.name in DECIDING}
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            given = json.load(f)
        chosen = {name: given.get(name, default) for name, default in deciding.items()}
    else:
        given = explicit_flags(argv)
        peek = argparse.ArgumentParser(add_help=False)  # these decide the defaults: read them first
        for name, default in deciding.items():
            peek.add_argument(f"--{name}", default=default)
        chosen = vars(peek.parse_known_args(argv)[0])
    defaults = {**script_defaults, **(chosen_defaults(chosen) if chosen_defaults else {}),
                **presets.get(chosen.get("preset"), {})}
    defaults = {name: value for name, value in defaults.items()
                if name not in given and not any(flag in given for flag in IMPLIED_BY.get(name, ()))}
    if isinstance(given, dict):  # JSON: the file's values win over the defaults
        return parser.parse_dict({**defaults, **given})
    parser.set_defaults(**defaults)  # argparse defaults: anything on the command line wins
    return parser.parse_args_into_dataclasses(args=argv)


def setup_logging(training_args, script_logger: str) -> None:
    """Logging as in transformers' examples: INFO on the main process, `log_level_replica` elsewhere,
    for the script's logger, grape_hf, datasets and transformers."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    for name in (script_logger, "grape_hf"):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def publish(trainer, description: str, dataset_tags: str | None = None, dataset_args: str | None = None) -> None:
    """Write the model card naming the data really used (`description`), and push to the Hub when
    `push_to_hub` is set. `dataset_tags`/`dataset_args`: the Hub id and config, only when the Hub
    data set itself was loaded (never for an embedded fallback)."""
    card = {"dataset": description}
    if dataset_tags is not None:
        card.update(dataset_tags=dataset_tags, dataset_args=dataset_args)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
