"""Every misuse fails early, with a message that names the problem and the fix."""

import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import (GPT2Model, GPTNeoXConfig, GPTNeoXForCausalLM, PretrainedConfig, PreTrainedModel,
                          TrainingArguments)

from grape_hf import MICRO_SUBLAYERS, GrapeTrainer, GrapeTrainingArguments, LocalityError
from tiny_models import VOCAB, tiny_gpt2, token_batch

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def grape_args(tmp_path, **kwargs) -> GrapeTrainingArguments:
    return GrapeTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **kwargs})


def token_dataset(n: int = 8, length: int = 16) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def train_and_check(model: nn.Module, trainer: GrapeTrainer, watched: list[str]) -> None:
    """Two steps run, the losses are finite and every watched parameter moved."""
    before = {name: model.get_parameter(name).detach().clone() for name in watched}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    for name in watched:
        assert not torch.equal(model.get_parameter(name), before[name]), name


# Invalid argument values ----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, valid", [
    ("rule", "backprop", ["'bp'", "'dfa'"]),
    ("setting", "nano", ["'macro'", "'micro'"]),
    ("feedback_init", "zeros", ["'normal'", "'uniform'", "'kaiming_uniform'"]),
    ("error_point", "hidden", ["'head_input'", "'logits'"]),
])
def test_invalid_choice_lists_valid_values(tmp_path, field, value, valid):
    with pytest.raises(ValueError, match=rf"{field}='{value}' is not valid; choose one of") as info:
        grape_args(tmp_path, **{field: value})
    for choice in valid:
        assert choice in str(info.value)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("flag", ["gradient_checkpointing", "activation_checkpointing"])  # old and new name
def test_gradient_checkpointing_refused_under_dfa(tmp_path, flag):
    with pytest.raises(ValueError, match=r"checkpointing does not work with rule='dfa'.*feedback hooks twice.*"
                                         r"Turn activation_checkpointing off"):
        grape_args(tmp_path, rule="dfa", **{flag: True})
    assert grape_args(tmp_path, rule="bp", **{flag: True}).activation_checkpointing  # BP is fine


def test_plain_training_arguments_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON)
    with pytest.raises(TypeError, match=r"GrapeTrainer needs GrapeTrainingArguments, got TrainingArguments"):
        GrapeTrainer(model=tiny_gpt2(), args=args)


# Models whose blocks cannot be found -----------------------------------------------------------------
class TinyConfig(PretrainedConfig):
    model_type = "grape_test_mlp"


class TinyMLP(PreTrainedModel):
    """A classifier with no declared block class: `_no_split_modules` is empty."""

    config_class = TinyConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.classifier = nn.Linear(8, 3)
        self.post_init()

    def forward(self, x, labels=None):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        logits = self.classifier(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class VectorDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def blockless_gpt2():
    model = tiny_gpt2()
    model._no_split_modules = []  # on the instance: the model no longer declares its block class
    return model


@pytest.mark.parametrize("make_model", [blockless_gpt2, lambda: TinyMLP(TinyConfig())], ids=["gpt2", "custom"])
def test_no_blocks_asks_for_feedback_modules(tmp_path, make_model):
    with pytest.raises(ValueError, match=r"No blocks found in .*_no_split_modules.*feedback_modules="):
        GrapeTrainer(model=make_model(), args=grape_args(tmp_path, rule="dfa"))


def test_no_blocks_gpt2_works_with_named_layers(tmp_path):
    model = blockless_gpt2()
    args = grape_args(tmp_path, rule="dfa", feedback_modules=["transformer.h.0", "transformer.h.1"], max_steps=2,
                      per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=token_dataset())
    assert trainer.feedback.point_names == ("transformer.h.0", "transformer.h.1")
    assert trainer.audit_locality().ok
    train_and_check(model, trainer, ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"])


def test_no_blocks_custom_model_works_with_named_layers(tmp_path):
    model = TinyMLP(TinyConfig())
    args = grape_args(tmp_path, rule="dfa", feedback_modules=["layers.*"], max_steps=2,
                      per_device_train_batch_size=4, learning_rate=1e-1, logging_steps=1)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=VectorDataset())
    assert trainer.feedback.point_names == ("layers.0", "layers.1")
    assert trainer.feedback.tap_name == "classifier:output"
    assert trainer.audit_locality().ok
    train_and_check(model, trainer, ["layers.0.weight", "layers.1.weight", "classifier.weight"])


def test_suggested_block_glob_selects_the_blocks(tmp_path):
    """The no-blocks error suggests `feedback_modules=['encoder.layers.*']` (and the micro error says "with '*'
    for the block index"): a trailing '*' must name the blocks. fnmatch's '*' also crosses '.', so today
    'transformer.h.*' selects every module inside every block (26 nested points on a 2-layer GPT-2) and the
    placement fails the library's own locality audit (idle points, leaks into the embeddings)."""
    trainer = GrapeTrainer(model=blockless_gpt2(), args=grape_args(tmp_path, rule="dfa",
                                                                   feedback_modules=["transformer.h.*"]))
    assert trainer.feedback.point_names == ("transformer.h.0", "transformer.h.1")
    report = trainer.audit_locality(token_batch(), raise_on_leak=False)
    assert report.ok, report.describe()


# Micro on an architecture the sub-layer table does not know -------------------------------------------
def tiny_neox() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                           bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(config)


def test_micro_on_unknown_architecture_names_block_class(tmp_path, monkeypatch):
    monkeypatch.delitem(MICRO_SUBLAYERS, "GPTNeoXLayer")  # an architecture the table does not know
    with pytest.raises(ValueError, match=r"micro setting does not know the sub-layers of GPTNeoXLayer.*"
                                         r"feedback_modules.*'gpt_neox\.layers\.\*\.<branch>'.*'attention', 'mlp'"):
        GrapeTrainer(model=tiny_neox(), args=grape_args(tmp_path, rule="dfa", setting="micro"))


def test_macro_and_named_sublayers_work_on_unknown_architecture(tmp_path):
    model = tiny_neox()
    macro = GrapeTrainer(model=model, args=grape_args(tmp_path, rule="dfa", setting="macro"))
    assert macro.feedback.point_names == ("embeddings", "gpt_neox.layers.0", "gpt_neox.layers.1")
    assert macro.audit_locality(token_batch()).ok
    macro.feedback.remove()

    # The fix the micro error proposes: name the sub-layers, '*' for the block index.
    args = grape_args(tmp_path, rule="dfa", setting="micro", max_steps=2, per_device_train_batch_size=4,
                      learning_rate=1e-2, logging_steps=1,
                      feedback_modules=["gpt_neox.layers.*.attention", "gpt_neox.layers.*.mlp"])
    named = GrapeTrainer(model=model, args=args, train_dataset=token_dataset())
    assert named.feedback.point_names == ("embeddings", "gpt_neox.layers.0.attention", "gpt_neox.layers.0.mlp",
                                          "gpt_neox.layers.1.attention", "gpt_neox.layers.1.mlp")
    assert named.audit_locality().ok
    train_and_check(model, named, ["gpt_neox.layers.0.attention.query_key_value.weight",
                                   "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"])


# Error tap and pattern problems ------------------------------------------------------------------------
@pytest.mark.parametrize("error_point", ["logits", None])
def test_model_without_head_has_no_error_tap(tmp_path, error_point):
    model = GPT2Model(tiny_gpt2().config)
    with pytest.raises(ValueError, match=r"GPT2Model has no output head.*Use a model with a head.*head_module"):
        GrapeTrainer(model=model, args=grape_args(tmp_path, rule="dfa", error_point=error_point))


def test_feedback_modules_pattern_matching_nothing(tmp_path):
    args = grape_args(tmp_path, rule="dfa", feedback_modules=["transformer.h.*.attn", "transformer.h.*.nope"])
    with pytest.raises(ValueError, match=r"feedback_modules pattern 'transformer\.h\.\*\.nope' matches no module "
                                         r"of GPT2LMHeadModel; module names look like: transformer"):
        GrapeTrainer(model=tiny_gpt2(), args=args)


def test_audit_names_leaking_parameters(tmp_path):
    """Points on the branches of a model whose blocks are not cut: the residual stream leaks, the audit says where."""
    args = grape_args(tmp_path, rule="dfa", feedback_modules=["transformer.h.*.attn", "transformer.h.*.mlp"])
    trainer = GrapeTrainer(model=blockless_gpt2(), args=args)
    with pytest.raises(LocalityError, match=r"LEAK transformer\.wpe\.weight receives gradient from"):
        trainer.audit_locality(token_batch())


def test_second_trainer_on_same_model_is_refused_or_replaces_the_first(tmp_path):
    """A second `GrapeTrainer` on a model that already carries feedback (a notebook cell run twice) must either
    refuse with a clear error or leave one working network. Today it stacks a second set of hooks on the
    first: the locality audit then finds leaks everywhere, so training silently computes neither DFA nor BP."""
    model = tiny_gpt2()
    GrapeTrainer(model=model, args=grape_args(tmp_path, rule="dfa", setting="micro"))
    try:
        second = GrapeTrainer(model=model, args=grape_args(tmp_path, rule="dfa", setting="micro"))
    except (ValueError, RuntimeError) as error:
        assert "feedback" in str(error)
        return
    report = second.audit_locality(token_batch(), raise_on_leak=False)
    assert report.ok, report.describe()


@pytest.mark.parametrize("old, new, value", [
    ("feedback_lr", "grape_lr", 0.3), ("feedback_smoothing", "grape_smoothing", "ema"),
    ("feedback_update_steps", "grape_update_steps", 1), ("error_module", "head_module", "lm_head"),
])
def test_old_argument_names_still_work_with_a_warning(tmp_path, old, new, value):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated.*use {new}"):
        args = grape_args(tmp_path, rule="grape", **{old: value})
    assert getattr(args, new) == value and getattr(args, old) is None
    with pytest.raises(ValueError, match=f"{old}=.* and {new}=.* both given"):
        grape_args(tmp_path, rule="grape", **{old: value, new: {"grape_lr": 0.5, "grape_smoothing": "cma",
                                                              "grape_update_steps": 2, "head_module": "x"}[new]})


def test_every_added_field_names_its_rules():
    """Owners live in field metadata, readable by code and invisible to argparse."""
    import dataclasses

    from transformers import HfArgumentParser, TrainingArguments

    from grape_hf.arguments import RULE_NAMES

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = [f for f in dataclasses.fields(GrapeTrainingArguments) if f.name not in base]
    for f in added:
        rules = f.metadata.get("rules")
        assert rules is not None and set(rules) <= set(RULE_NAMES), f.name
        assert "rules" not in dict(f.metadata)  # HfArgumentParser passes every iterated key to argparse
    owners = {f.name: f.metadata["rules"] for f in added}
    assert owners["grape_lr"] == ("grape",) and owners["pepita_f_scale"] == ("pepita",)
    assert "fa" in owners["feedback_init"] and "fa" not in owners["setting"]
    HfArgumentParser(GrapeTrainingArguments)  # builds


def test_no_blocks_error_suggests_names_the_model_has(tmp_path):
    """HF ResNet declares no block class in a ModuleList; the error used to suggest 'encoder.layers.*', a
    name it does not have. It suggests its own repeated modules, and they work."""
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                      depths=[1, 1], num_labels=3))
    model._no_split_modules = []  # its stages are found as blocks now (issue 11); without a declared class, not
    with pytest.raises(ValueError, match=r"feedback_modules=\['resnet\.encoder\.stages\.\*'\]"):
        GrapeTrainer(model=model, args=grape_args(tmp_path, rule="dfa"))
    trainer = GrapeTrainer(model=model, args=grape_args(tmp_path, rule="dfa",
                                                        feedback_modules=["resnet.encoder.stages.*"]))
    assert trainer.feedback.point_names == ("resnet.encoder.stages.0", "resnet.encoder.stages.1")
