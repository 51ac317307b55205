"""The library's table of recommended settings (`grape_hf.recommended`): a run with only `rule` set is the run
with the table's values passed by hand; what the user gives wins; every run states what it used; a model kind
without an entry says so; a climbing training loss is reported once."""

import importlib.util
import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from tiny_models import image_dataset, quick_args, tiny_gpt2, tiny_vit, token_dataset
from transformers import AutoModelForCausalLM

from grape_hf import GrapeTrainer, build_image_model
from grape_hf.diagnostics.loss_trend import LossTrend
from grape_hf.recommended import PAPER_VALUES, RECOMMENDED_FIELDS, REGIMES, TABLE, model_kind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(model, dataset, tmp_path, **kwargs) -> GrapeTrainer:
    trainer = GrapeTrainer(model=model, args=quick_args(tmp_path, max_steps=3, **kwargs), train_dataset=dataset)
    trainer.train()
    return trainer


def tiny_mlp():
    torch.manual_seed(0)
    return build_image_model("mlp", num_labels=5, num_channels=3, image_size=16, hidden_size=32, num_hidden_layers=2)


@pytest.mark.parametrize("rule", ["dfa", "grape"])
@pytest.mark.parametrize("family", ["lm", "mlp"])
def test_only_rule_is_bitwise_the_table_passed_by_hand(tmp_path, rule, family):
    build, data = (tiny_gpt2, token_dataset) if family == "lm" else (tiny_mlp, image_dataset)
    kind = ("causal_lm" if family == "lm" else "mlp_cnn", "scratch")
    values = TABLE[kind][rule].values
    assert values, "the table has an entry for this kind"
    alone = train(build(), data(), tmp_path / "alone", rule=rule)
    by_hand = train(build(), data(), tmp_path / "hand", rule=rule, **values)
    assert alone.feedback.settings.values == by_hand.feedback.settings.values
    assert set(alone.feedback.settings.origins.values()) == {"recommended"}
    assert set(by_hand.feedback.settings.origins.values()) == {"given"}
    for (name, a), b in zip(alone.model.state_dict().items(), by_hand.model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, matrix in alone.feedback.matrices.tensors.items():
        assert torch.equal(matrix, by_hand.feedback.matrices.tensors[name]), name
    # The table's values really change the run (the test could fail): the paper's values train other weights.
    paper = train(build(), data(), tmp_path / "paper", rule=rule,
                  **{name: PAPER_VALUES[name] for name in alone.feedback.settings.values})
    if alone.feedback.settings.values != paper.feedback.settings.values:
        assert any(not torch.equal(a, b) for a, b in zip(alone.model.parameters(), paper.model.parameters()))


def test_given_values_win_and_the_given_arguments_are_not_changed(tmp_path):
    args = quick_args(tmp_path, rule="grape", block_lr_scale=0.5, grape_smoothing="cma")
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset())
    settings = trainer.feedback.settings
    assert settings.values["block_lr_scale"] == 0.5 and settings.origins["block_lr_scale"] == "given"
    assert settings.values["grape_smoothing"] == "cma" and settings.origins["grape_smoothing"] == "given"
    assert settings.values["grape_lr"] == TABLE["causal_lm", "scratch"]["grape"].values["grape_lr"]
    assert trainer.args.block_lr_scale == 0.5 and trainer.args.feedback_init == "identity"
    assert trainer.args is trainer.feedback.args and trainer.given_args is args
    assert args.feedback_init is None and args.grape_lr is None  # the caller's object keeps what it was given
    trainer.train()
    lrs = sorted({group["initial_lr"] for group in trainer.optimizer.param_groups})
    assert lrs == [pytest.approx(0.5 * 1e-2), pytest.approx(1e-2)]  # the blocks at the given scale (lr 1e-2)


def test_model_kinds(tmp_path):
    args = quick_args(tmp_path, rule="dfa")
    assert model_kind(tiny_gpt2(), args) == ("causal_lm", "scratch")
    assert model_kind(tiny_mlp(), args) == ("mlp_cnn", "scratch")
    assert model_kind(tiny_vit(), args) == ("vit", "scratch")
    assert model_kind(tiny_gpt2(), quick_args(tmp_path, rule="dfa", error_point="head_input")) == ("other", "scratch")
    tiny_gpt2().save_pretrained(tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")  # the real loading path marks it pretrained
    assert model_kind(loaded, args) == ("causal_lm", "pretrained")
    assert model_kind(loaded, quick_args(tmp_path, rule="dfa", pretrained=False)) == ("causal_lm", "scratch")
    assert model_kind(tiny_gpt2(), quick_args(tmp_path, rule="dfa", pretrained=True)) == ("causal_lm", "pretrained")


def test_block_lr_scale_on_a_model_without_input_embeddings(tmp_path):
    """The MLP has no input embeddings (transformers raises NotImplementedError for them): its hidden layers are
    the blocks whose learning rate block_lr_scale scales."""
    trainer = train(tiny_mlp(), image_dataset(), tmp_path, rule="dfa", block_lr_scale=0.3)
    scaled = [group for group in trainer.optimizer.param_groups if group["initial_lr"] == pytest.approx(3e-3)]
    assert scaled and {id(p) for group in scaled for p in group["params"]} == trainer.feedback.block_parameters()


def test_pretrained_model_gets_the_fine_tuning_row(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "lm")
    trainer = GrapeTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "lm"),
                           args=quick_args(tmp_path, rule="dfa"), train_dataset=token_dataset())
    assert trainer.feedback.settings.training == "pretrained"
    assert trainer.feedback.settings.values == TABLE["causal_lm", "pretrained"]["dfa"].values


def test_kind_without_an_entry_says_so_and_takes_the_papers_values(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="grape_hf"):
        trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="dfa", error_point="head_input"),
                               train_dataset=token_dataset())
    assert "No measured recommendation for rule 'dfa'" in caplog.text and "feedback_init" in caplog.text
    assert set(trainer.feedback.settings.origins.values()) == {"paper"}
    assert trainer.feedback.settings.source is None
    assert trainer.args.feedback_init == PAPER_VALUES["feedback_init"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="grape_hf"):  # everything given: nothing to say
        GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="dfa", error_point="head_input",
                                                        feedback_init="normal", block_lr_scale=1.0),
                     train_dataset=token_dataset())
    assert "No measured recommendation" not in caplog.text


def test_settings_are_logged_in_the_checkpoint_and_the_card(tmp_path, caplog):
    args = quick_args(tmp_path, rule="dfa", save_strategy="steps", save_steps=2, block_lr_scale=0.5)
    with caplog.at_level(logging.INFO, logger="grape_hf"):
        trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset())
    assert "feedback_init='identity' (recommended)" in caplog.text and "block_lr_scale=0.5 (given)" in caplog.text
    trainer.train()
    with safe_open(os.path.join(args.output_dir, "checkpoint-2", "feedback.safetensors"), "pt") as file:
        assert json.loads(file.metadata()["settings"]) == {"feedback_init": "identity", "block_lr_scale": 0.5}
    trainer.save_model()
    card = open(os.path.join(args.output_dir, "README.md"), encoding="utf-8").read()
    assert "| feedback_init | `identity` (recommended) |" in card and "| block_lr_scale | `0.5` (given) |" in card
    assert "benchmarks/lm_fidelity.py" in card  # the source of the recommended values


def test_resuming_with_other_settings_warns(tmp_path, caplog):
    args = quick_args(tmp_path, rule="grape", save_strategy="steps", save_steps=2)
    GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset()).train()
    checkpoint = os.path.join(args.output_dir, "checkpoint-2")
    for grape_lr, warns in ((0.05, True), (None, False)):
        caplog.clear()
        other = quick_args(tmp_path, rule="grape", max_steps=3, grape_lr=grape_lr)
        with caplog.at_level(logging.WARNING, logger="grape_hf"):
            GrapeTrainer(model=tiny_gpt2(), args=other, train_dataset=token_dataset()).train(
                resume_from_checkpoint=checkpoint)
        assert ("grape_lr 0.1 -> 0.05" in caplog.text) == warns


def test_resuming_with_other_optimizer_groups_names_block_lr_scale(tmp_path):
    args = quick_args(tmp_path, rule="dfa", save_strategy="steps", save_steps=2)  # blocks at 0.3 x: their own group
    GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset()).train()
    other = quick_args(tmp_path, rule="dfa", max_steps=3, block_lr_scale=1.0)
    with pytest.raises(ValueError, match="block_lr_scale=1.0 gives the blocks no group"):
        GrapeTrainer(model=tiny_gpt2(), args=other, train_dataset=token_dataset()).train(
            resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_keep_no_table_of_their_own(tmp_path):
    """run_wikitext leaves the recommended fields to the library; run_image_classification applies the library's
    published regimes, each part only where the user passed nothing."""
    out = ["--output_dir", str(tmp_path)]
    wikitext = load_example("run_wikitext")
    for rule in ("dfa", "grape"):
        _, _, train_args = wikitext.parse_args([*out, "--rule", rule])
        assert all(getattr(train_args, name) is None for name in RECOMMENDED_FIELDS)
    images = load_example("run_image_classification")
    regime = REGIMES["grape_mlp", "drtp"]
    model, _, train_args = images.parse_args([*out, "--rule", "drtp"])
    assert train_args.optim == regime.trainer["optim"] and train_args.learning_rate == regime.trainer["learning_rate"]
    assert json.loads(model.config_overrides) == regime.model
    model, _, train_args = images.parse_args([*out, "--rule", "drtp", "--learning_rate", "3e-4",
                                              "--config_overrides", '{"hidden_size": 64}'])
    assert train_args.learning_rate == 3e-4 and train_args.optim == regime.trainer["optim"]
    assert json.loads(model.config_overrides) == {"hidden_size": 64}
    model, _, train_args = images.parse_args([*out, "--rule", "drtp", "--model", "vit"])  # no regime measured there
    assert train_args.learning_rate == 1e-4 and model.config_overrides is None
    _, _, train_args = images.parse_args([*out, "--rule", "dfa"])
    assert train_args.learning_rate == 1e-4 and all(getattr(train_args, n) is None for n in RECOMMENDED_FIELDS)


def test_off_regime_run_says_so_once_with_the_flags(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="grape_hf"):
        GrapeTrainer(model=tiny_mlp(), args=quick_args(tmp_path, rule="drtp"), train_dataset=image_dataset())
    assert caplog.text.count("published regime") == 1 and "hidden_act='tanh'" in caplog.text
    caplog.clear()
    torch.manual_seed(0)
    tanh = build_image_model("mlp", num_labels=5, num_channels=3, image_size=16, hidden_size=32, num_hidden_layers=2,
                             hidden_act="tanh")
    with caplog.at_level(logging.WARNING, logger="grape_hf"):
        GrapeTrainer(model=tanh, args=quick_args(tmp_path, rule="drtp", **REGIMES["grape_mlp", "drtp"].trainer),
                     train_dataset=image_dataset())
    assert "published regime" not in caplog.text


# A climbing loss is reported once ---------------------------------------------------------------------------
def test_loss_trend_fires_on_a_climb_and_stays_quiet_on_healthy_runs(caplog):
    generator = torch.Generator().manual_seed(0)
    noise = (0.05 * torch.randn(400, generator=generator)).tolist()
    healthy = [3.0 * 0.995 ** step + 1.0 + noise[step] for step in range(400)]  # falling, noisy
    plateau = [2.0 + noise[step] for step in range(400)]
    climbing = [3.5 - 0.3 * min(step, 20) / 20 + 0.6 * max(step - 20, 0) / 180 + noise[step] for step in range(200)]
    for losses, fires in ((healthy, False), (plateau, False), (climbing, True)):
        trend = LossTrend("dfa")
        with caplog.at_level(logging.WARNING, logger="grape_hf"):
            fired = [step for step, loss in enumerate(losses) if trend.add(step, loss)]
        assert len(fired) == (1 if fires else 0)
    assert caplog.text.count("has climbed") == 1 and "rule='dfa'" in caplog.text


def test_a_trainer_run_whose_loss_climbs_says_so(tmp_path, caplog):
    """DFA with random feedback on a tiny GPT-2 whose learning rate warms up to 1.0: the loss first falls, then
    climbs, and the log says so once; the same run at a sound learning rate with the recommended settings stays
    quiet."""
    sequence = torch.arange(16) % 7
    data = token_dataset(n=64).map(lambda row: {"input_ids": sequence, "labels": sequence}).with_format("torch")
    runs = {}
    for name, extra in (("too fast", dict(feedback_init="normal", block_lr_scale=1.0, learning_rate=1.0,
                                          warmup_steps=100, lr_scheduler_type="constant_with_warmup")),
                        ("sound", dict(learning_rate=1e-2, lr_scheduler_type="constant"))):
        caplog.clear()
        trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path / name, rule="dfa", max_steps=120, **extra),
                               train_dataset=data)
        with caplog.at_level(logging.WARNING, logger="grape_hf"):
            trainer.train()
        runs[name] = (caplog.text.count("has climbed"), [entry["loss"] for entry in trainer.state.log_history
                                                         if "loss" in entry])
    warnings, losses = runs["too fast"]
    assert warnings == 1, "the climbing run must be reported, once"
    assert min(losses[90:]) > min(losses[:60]) + 0.5  # it did climb
    warnings, losses = runs["sound"]
    assert warnings == 0 and losses[-1] < losses[0] - 1
