"""TRL's `SFTTrainer` under the rules (`grape_hf.sft`): SFTConfig's defaults kept, its fused LM-head loss and
metrics used, DFA and GrAPE training every parameter through it, BP identical to a plain SFTTrainer."""

import dataclasses
import math
import random

import pytest
import torch

trl = pytest.importorskip("trl")  # the `trl` extra: `pip install -e ".[dev,trl]"` (the README's test command)

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from grape_hf.sft import GrapeSFTConfig, GrapeSFTTrainer  # noqa: E402

WORDS = "the cat sat on a mat and dog ran far away".split()
COMMON = dict(max_steps=3, per_device_train_batch_size=8, use_cpu=True, report_to="none", save_strategy="no",
              disable_tqdm=True, logging_steps=1, max_length=16, bf16=False, seed=0, learning_rate=1e-3)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<pad>", "<eos>"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def text_dataset(n: int = 32) -> Dataset:
    """Sentences of 4-12 words: SFTTrainer tokenizes them and pads each batch to its longest."""
    rng = random.Random(0)
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                                       for _ in range(n)]})


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS) + 2, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(config)


def test_config_keeps_sftconfig_defaults():
    """Every field SFTConfig sets has SFTConfig's default, but gradient checkpointing (the rules refuse it)."""
    ours = GrapeSFTConfig(output_dir="out", rule="bp", use_cpu=True)
    theirs = trl.SFTConfig(output_dir="out", use_cpu=True)
    differing = {f.name for f in dataclasses.fields(trl.SFTConfig)
                 if getattr(ours, f.name) != getattr(theirs, f.name)}
    assert differing == {"gradient_checkpointing", "activation_checkpointing"}  # the latter its new name
    assert ours.learning_rate == 2e-5 and ours.logging_steps == 10  # SFTConfig's, not TrainingArguments' 5e-5, 500
    assert GrapeSFTConfig(output_dir="out", rule="dfa", use_cpu=True).error_point == "residual"


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_rule_trains_every_parameter_through_sfttrainer(tmp_path, rule):
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = GrapeSFTConfig(output_dir=str(tmp_path), rule=rule, **COMMON)
    trainer = GrapeSFTTrainer(model, args=args, train_dataset=text_dataset(), processing_class=word_tokenizer())
    trainer.train()
    unmoved = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unmoved == []
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(math.isfinite(entry["loss"]) for entry in logs)
    # SFTTrainer's own compute_loss ran (the fused head's metrics) inside the rule's forward:
    assert all("mean_token_accuracy" in entry for entry in logs)
    assert rule != "grape" or all("alignment/mean" in entry for entry in logs)
    report = trainer.audit_locality()
    assert report.ok


def test_bp_equals_plain_sfttrainer(tmp_path):
    weights = []
    for trainer_class, config_class, extra in ((GrapeSFTTrainer, GrapeSFTConfig, {"rule": "bp"}),
                                               (trl.SFTTrainer, trl.SFTConfig, {"gradient_checkpointing": False})):
        model = tiny_model()
        args = config_class(output_dir=str(tmp_path / config_class.__name__), **COMMON, **extra)
        trainer_class(model, args=args, train_dataset=text_dataset(), processing_class=word_tokenizer()).train()
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(rule="dfa", error_point="head_input"), "fused LM-head loss"),
    (dict(rule="drtp"), "never builds the logits"),
    (dict(rule="dfa", gradient_checkpointing=True), "checkpointing"),
])
def test_impossible_combinations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrapeSFTConfig(output_dir="out", use_cpu=True, **kwargs)


def test_trainer_needs_grape_sft_config(tmp_path):
    with pytest.raises(TypeError, match="GrapeSFTConfig"):
        GrapeSFTTrainer(tiny_model(), args=trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True), train_dataset=text_dataset(),
                        processing_class=word_tokenizer())
