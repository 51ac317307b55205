"""`GrapeTrainer` inside the stock `Trainer`: BP parity, gradient accumulation, bf16, hooks, checkpoints, CLI, audit."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from tiny_models import VOCAB, image_batch, tiny_gpt2, tiny_vit, token_batch

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)


def token_dataset(n: int, length: int = 16, seed: int = 1) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def grape_args(tmp_path, name: str, **kwargs) -> GrapeTrainingArguments:
    return GrapeTrainingArguments(output_dir=str(tmp_path / name), **{**COMMON, **kwargs})


class RecordingCollator:
    """`default_data_collator` that remembers the input_ids of every batch it builds."""

    def __init__(self):
        self.seen = []

    def __call__(self, features):
        batch = default_data_collator(features)
        self.seen.append(batch["input_ids"].clone())
        return batch


def losses_of(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def grad_norms_of(trainer) -> list[float]:
    return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if atol is None:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


# 1. rule="bp" is the stock Trainer ---------------------------------------------------------------
def test_bp_rule_reproduces_stock_trainer(tmp_path):
    dataset = token_dataset(40)
    settings = dict(max_steps=10, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3, **COMMON)
    initial = tiny_gpt2()

    stock_model = tiny_gpt2()
    stock = Trainer(model=stock_model, args=TrainingArguments(output_dir=str(tmp_path / "stock"), **settings),
                    train_dataset=dataset)
    stock.train()

    grape_model = tiny_gpt2()
    grape = GrapeTrainer(model=grape_model,
                         args=GrapeTrainingArguments(output_dir=str(tmp_path / "grape"), rule="bp", **settings),
                         train_dataset=dataset)
    assert grape.feedback is None
    grape.train()

    stock_losses, grape_losses = losses_of(stock), losses_of(grape)
    assert len(stock_losses) == 10
    assert len(set(stock_losses)) > 1  # the loss moves: training happened
    assert grape_losses == stock_losses
    assert grad_norms_of(grape) == grad_norms_of(stock)
    assert_same_weights(grape_model, stock_model)
    assert not torch.equal(grape_model.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight)


# 2. Gradient accumulation under DFA --------------------------------------------------------------
def run_one_dfa_step(tmp_path, name: str, setting: str, batch_size: int, accumulation: int):
    model = tiny_gpt2()
    collator = RecordingCollator()
    args = grape_args(tmp_path, name, rule="dfa", setting=setting, optim="sgd", learning_rate=0.1, max_steps=1,
                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                      logging_steps=1)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=token_dataset(8), data_collator=collator)
    trainer.train()
    return model, collator.seen, trainer


@pytest.mark.parametrize("setting", ["macro", "micro"])
def test_dfa_gradient_accumulation_matches_one_big_batch(tmp_path, setting):
    initial = tiny_gpt2()
    accumulated, seen_accumulated, _ = run_one_dfa_step(tmp_path, "ga", setting, batch_size=4, accumulation=2)
    single, seen_single, trainer = run_one_dfa_step(tmp_path, "single", setting, batch_size=8, accumulation=1)

    # Both runs saw the same 8 samples in the same (seeded) sampler order.
    assert [b.shape[0] for b in seen_accumulated] == [4, 4]
    assert [b.shape[0] for b in seen_single] == [8]
    assert torch.equal(torch.cat(seen_accumulated), seen_single[0])
    assert trainer.state.global_step == 1

    assert_same_weights(accumulated, single, atol=1e-6)
    # The update itself agrees, relative to its size, and is real: every parameter below the head moved
    # (DFA reaches every segment), not only those the error reaches by BP.
    before, after_ga, after_single = initial.state_dict(), accumulated.state_dict(), single.state_dict()
    for name in before:
        update_ga, update_single = after_ga[name] - before[name], after_single[name] - before[name]
        assert update_single.abs().max() > 0, name
        assert (update_ga - update_single).norm() <= 1e-3 * update_single.norm(), name


# 3. bf16 autocast on CPU -------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_bf16_on_cpu_trains_with_float32_feedback(tmp_path, rule):
    model = tiny_gpt2()
    args = grape_args(tmp_path, "bf16", rule=rule, setting="micro", bf16=True, max_steps=5,
                      per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=token_dataset(20))
    trainer.train()
    losses = losses_of(trainer)
    assert len(losses) == 5
    assert all(math.isfinite(loss) for loss in losses)
    assert all(math.isfinite(norm) and norm > 0 for norm in grad_norms_of(trainer))
    matrices = trainer.feedback.matrices.tensors
    assert set(matrices) == set(trainer.feedback.point_names)
    assert all(m.dtype == torch.float32 for m in matrices.values())


# 4. Hooks under no_grad, and remove() ------------------------------------------------------------
def module_hooks(model: torch.nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
            + len(m._forward_pre_hooks_with_kwargs) for name, m in model.named_modules()}


@pytest.mark.parametrize("setting", ["macro", "micro"])
def test_hooks_are_inert_under_no_grad_and_removable(tmp_path, setting):
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    trainer = GrapeTrainer(model=model, args=grape_args(tmp_path, "hooks", rule="dfa", setting=setting))
    assert sum(module_hooks(model).values()) > 0  # installed
    batch = token_batch()

    with torch.no_grad():
        logits = model(**batch).logits
        expected = reference(**batch).logits
    assert torch.equal(logits, expected)
    assert trainer.feedback.network._recorded == {}
    assert trainer.feedback.matrices.tensors == {}  # no matrix created without gradients

    # With gradients on, DFA gradients differ from BP (this is what remove() must undo).
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    dfa_grad = model.transformer.h[0].attn.c_attn.weight.grad.clone()
    assert not torch.equal(dfa_grad, reference.transformer.h[0].attn.c_attn.weight.grad)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    trainer.feedback.remove()
    assert module_hooks(model) == module_hooks(reference)
    assert all(count == 0 for count in module_hooks(model).values())
    assert trainer.feedback.network._recorded == {}

    loss = model(**batch).loss
    ref_loss = reference(**batch).loss
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, param in params.items():
        assert param.grad is not None and torch.equal(param.grad, ref_params[name].grad), name


# 5. Feedback matrices live outside the model; point names ----------------------------------------
def test_feedback_not_in_state_dict_or_checkpoint(tmp_path):
    model = tiny_gpt2()
    fresh = tiny_gpt2(seed=3)
    args = grape_args(tmp_path, "ckpt", rule="dfa", setting="micro", max_steps=1, per_device_train_batch_size=4)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=token_dataset(4))
    assert model.state_dict().keys() == fresh.state_dict().keys()
    trainer.train()
    assert trainer.feedback.matrices.tensors  # matrices exist after a step ...
    assert model.state_dict().keys() == fresh.state_dict().keys()  # ... but not in the model

    trainer.save_model()
    fresh.save_pretrained(tmp_path / "fresh")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as saved, \
            safe_open(str(tmp_path / "fresh" / "model.safetensors"), "pt") as reference:
        saved_keys, reference_keys = set(saved.keys()), set(reference.keys())
        assert saved_keys == reference_keys
        # The checkpoint holds the trained weights.
        key = "transformer.h.0.mlp.c_fc.weight"
        assert torch.equal(saved.get_tensor(key), model.state_dict()[key])


def matrices_after_one_forward(tmp_path, name: str, **kwargs) -> dict[str, torch.Tensor]:
    trainer = GrapeTrainer(model=tiny_gpt2(), args=grape_args(tmp_path, name, rule="dfa", setting="micro",
                                                              feedback_init="normal", **kwargs))  # random matrices
    assert trainer.feedback.matrices.tensors == {}  # created at the first forward pass
    trainer.model(**token_batch())
    return trainer.feedback.matrices.tensors


def test_feedback_matrices_follow_feedback_seed(tmp_path):
    first = matrices_after_one_forward(tmp_path, "a", feedback_seed=7)
    torch.manual_seed(1234)  # the global RNG plays no part
    second = matrices_after_one_forward(tmp_path, "b", feedback_seed=7)
    other = matrices_after_one_forward(tmp_path, "c", feedback_seed=8)
    assert first.keys() == second.keys() == other.keys() and len(first) == 5
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert not torch.equal(first[name], other[name]), name
        assert first[name].shape == (32, 32)  # d_model x d_model: the error is the head's input
    # Distinct points get distinct matrices.
    assert not torch.equal(first["transformer.h.0.attn"], first["transformer.h.0.mlp"])


def test_feedback_seed_defaults_to_seed(tmp_path):
    assert grape_args(tmp_path, "s", seed=11).feedback_seed == 11
    assert grape_args(tmp_path, "s", seed=11, feedback_seed=5).feedback_seed == 5


def test_point_names_and_taps(tmp_path):
    gpt2 = GrapeTrainer(model=tiny_gpt2(), args=grape_args(tmp_path, "g", rule="dfa", setting="micro"))
    assert gpt2.feedback.point_names == ("embeddings", "transformer.h.0.attn", "transformer.h.0.mlp",
                                         "transformer.h.1.attn", "transformer.h.1.mlp")
    assert gpt2.feedback.tap_name == "transformer.ln_f:input"  # error_point="residual", the causal-LM default
    head = GrapeTrainer(model=tiny_gpt2(), args=grape_args(tmp_path, "h", rule="dfa", error_point="head_input"))
    assert head.feedback.tap_name == "lm_head:input"

    macro = GrapeTrainer(model=tiny_gpt2(), args=grape_args(tmp_path, "m", rule="dfa", setting="macro"))
    assert macro.feedback.point_names == ("embeddings", "transformer.h.0", "transformer.h.1")

    vit_model = tiny_vit()
    vit = GrapeTrainer(model=vit_model, args=grape_args(tmp_path, "v", rule="dfa", setting="micro"))
    assert vit.feedback.tap_name == "classifier:output"
    assert vit.feedback.point_names[0] == "embeddings"
    vit_model(**image_batch())
    # Logits as error: each point's matrix maps the 5 classes to d (32), broadcast over the 17 tokens.
    assert all(m.shape == (32, 5) for m in vit.feedback.matrices.tensors.values())


# 6. Every field is a CLI flag ---------------------------------------------------------------------
def test_arguments_parse_from_command_line(tmp_path):
    parser = HfArgumentParser(GrapeTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--rule", "dfa", "--setting", "micro", "--feedback_modules",
         "transformer.h.*.attn", "--feedback_embeddings", "false", "--feedback_init", "uniform",
         "--feedback_seed", "3", "--error_point", "logits", "--use_cpu", "true", "--report_to", "none"])
    assert isinstance(args, GrapeTrainingArguments)
    assert args.rule == "dfa"
    assert args.setting == "micro"
    assert args.feedback_modules == ["transformer.h.*.attn"]
    assert args.feedback_embeddings is False
    assert args.feedback_init == "uniform"
    assert args.feedback_seed == 3
    assert args.error_point == "logits"

    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (defaults.rule, defaults.setting, defaults.feedback_modules, defaults.feedback_embeddings) == \
        ("dfa", "macro", None, True)
    assert defaults.feedback_seed == defaults.seed


@pytest.mark.parametrize("flag, value", [("--rule", "backprop"), ("--setting", "nano"),
                                         ("--feedback_init", "zeros")])
def test_invalid_choice_on_command_line_exits(tmp_path, capsys, flag, value):
    parser = HfArgumentParser(GrapeTrainingArguments)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), flag, value])
    assert exit_info.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert "invalid choice" in err and value in err


# 7. The trainer's locality audit ------------------------------------------------------------------
def test_trainer_audit_locality_gpt2_micro(tmp_path):
    args = grape_args(tmp_path, "audit", rule="dfa", setting="micro", per_device_train_batch_size=4)
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset(8))
    report = trainer.audit_locality()
    assert report.ok, report.describe()
    assert report.leaks == {} and report.idle_points == []
    assert set(report.receivers) == {*trainer.feedback.point_names, "error tap"}
    assert "transformer.h.0.attn.c_attn.weight" in report.receivers["transformer.h.0.attn"]
    assert "transformer.h.1.mlp.c_fc.weight" in report.receivers["transformer.h.1.mlp"]
    assert "transformer.wpe.weight" in report.receivers["embeddings"]
    # No segment reaches into another block.
    assert not any(name.startswith("transformer.h.1.") for name in report.receivers["transformer.h.0.mlp"])


def test_trainer_audit_locality_refuses_bp(tmp_path):
    trainer = GrapeTrainer(model=tiny_gpt2(), args=grape_args(tmp_path, "bp", rule="bp"),
                           train_dataset=token_dataset(4))
    with pytest.raises(ValueError, match="no feedback points"):
        trainer.audit_locality()


def test_modes_are_always_left_and_do_not_nest(tmp_path):
    """A mode entered with `with` is left even when the forward inside fails, and a second mode cannot
    be entered inside the first (so nothing runs with a mode someone forgot)."""
    model = tiny_gpt2()
    rule = GrapeTrainer(model=model, args=grape_args(tmp_path, "modes", rule="grape")).feedback
    for mode in (rule.bp_step, rule.observing, rule.as_trained):
        with pytest.raises(ZeroDivisionError):
            with mode():
                1 / 0
        assert rule.network._mode is None and not rule._bypass
    with rule.observing():
        with pytest.raises(RuntimeError, match="modes do not nest"):
            with rule.bp_step():
                pass
    with pytest.raises(ZeroDivisionError):
        with rule.isolating("embeddings"):
            1 / 0
    assert rule.network.isolated is None
    rule.remove()


def test_trainer_has_no_rule_specific_branch():
    """The trainer drives the Rule interface only: no rule but 'bp' (no rule installed) is named in it."""
    import grape_hf.trainer
    from grape_hf.arguments import RULE_NAMES

    source = open(grape_hf.trainer.__file__, encoding="utf-8").read()
    for name in RULE_NAMES[1:]:
        assert f'"{name}"' not in source and f"'{name}'" not in source, name
