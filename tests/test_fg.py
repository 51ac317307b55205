"""The forward gradient (rule='fg', Baydin et al. 2022): its update is its formula, its mean is the true gradient,
a loss the tangents cannot reach is refused, its runs are deterministic and resume bitwise, and it refuses what has
no meaning for it.

The formula, written here without grape_hf: for optimizer step t and trainable parameter `name`,
v = N(0, I) from `torch.Generator().manual_seed(sha256(f"{feedback_seed}:fg:{t}:{name}")[:8] >> 1)`,
g = grad L . v (here by `torch.func.jvp`, not by the rule's dual tensors), and plain SGD gives theta' = theta - lr g v.
"""

import hashlib

import pytest
import torch
from datasets import Dataset
from torch import nn
from torch.func import functional_call, jvp

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.models import build_image_model
from grape_hf.rules import RULES
from test_mezo import counting_ids, gpt2_with_dropout
from tiny_models import image_dataset, tiny_gpt2

LR, BATCH = 0.05, 8
COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no", optim="sgd",
              learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, per_device_train_batch_size=BATCH,
              logging_steps=1, dataloader_num_workers=0)


def lm_dataset(n: int = 32) -> Dataset:
    ids = counting_ids(n).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def tiny_mlp(seed: int = 0, **config):
    torch.manual_seed(seed)
    return build_image_model("mlp", num_labels=5, num_channels=3, image_size=16,
                             **{"hidden_size": 16, "num_hidden_layers": 2, **config})


def make_trainer(tmp_path, model, dataset=None, **overrides) -> GrapeTrainer:
    args = GrapeTrainingArguments(output_dir=str(tmp_path), **{**COMMON, "rule": "fg", "max_steps": 1, **overrides})
    return GrapeTrainer(model=model, args=args, train_dataset=dataset if dataset is not None else lm_dataset())


def v_by_hand(seed: int, step: int, name: str, like: torch.Tensor) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}:fg:{step}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype)


def trainable_copy(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def directional_derivative(model, weights: dict, directions: dict, batch: dict) -> float:
    """grad L(weights) . directions by torch.func.jvp of the Trainer's loss of `batch` (eager attention: SDPA has no
    forward AD; tied weights share their direction, as functional_call ties them)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    _, tangent = jvp(lambda w: functional_call(model, w, args=(), kwargs=batch).loss, (weights,), (directions,))
    return float(tangent)


# The Trainer's loss of the whole batch: a causal LM's token losses summed over the labels it counts (all of them,
# `num_items_in_batch`, including each row's first, which the shifted loss has no prediction for); the MLP's mean.
IDS = counting_ids()
CASES = {
    "gpt2": (tiny_gpt2, lambda: lm_dataset(), {"input_ids": IDS, "labels": IDS, "num_items_in_batch": IDS.numel()}),
    "mlp": (tiny_mlp, lambda: image_dataset(32), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_equals_the_formula(tmp_path, case):
    build, data, batch = CASES[case]
    if batch is None:
        rows = image_dataset(32)[:]
        batch = {"pixel_values": rows["pixel_values"], "labels": rows["labels"]}
    model = build()
    before = trainable_copy(model)
    trainer = make_trainer(tmp_path, model, data(), per_device_train_batch_size=32)
    trainer.train()
    v = {name: v_by_hand(0, 0, name, value) for name, value in before.items()}
    g = directional_derivative(build(), before, v, batch)
    assert abs(g) > 1e-2  # a real step
    for name, p in model.named_parameters():
        assert isinstance(p, nn.Parameter)  # the dual parameters were swapped back
        update, wanted = p.detach() - before[name], -LR * g * v[name]
        torch.testing.assert_close(update, wanted, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    logged = [h["fg/projected_grad"] for h in trainer.state.log_history if "fg/projected_grad" in h]
    assert logged == pytest.approx([abs(g)], rel=1e-4)


def test_mean_of_many_draws_is_the_true_gradient():
    """E[g v] = E[v v^T] grad L = grad L: over 200 steps' directions on a 163-parameter MLP, the mean of g v has a
    cosine of about 1 / sqrt(1 + d / 200) = 0.74 with BP's gradient; one draw's is about 1 / sqrt(d) = 0.08, and a
    wrong direction (another v than the one moved along, a sign) gives about 0 or below."""
    model = build_image_model("mlp", num_labels=3, num_channels=1, image_size=4, hidden_size=8, num_hidden_layers=1,
                              hidden_act="tanh")
    parameters = [p for p in model.parameters()]
    assert sum(p.numel() for p in parameters) == 163
    generator = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(16, 1, 4, 4, generator=generator),
             "labels": torch.randint(0, 3, (16,), generator=generator)}
    true = torch.cat([g.flatten() for g in torch.autograd.grad(model(**batch).loss, parameters)])
    args = GrapeTrainingArguments(output_dir="unused", rule="fg", use_cpu=True, report_to="none", seed=0)
    rule = RULES["fg"](model, args)
    draws = 200
    try:
        for step in range(draws):
            loss, _ = rule.training_forward(lambda b: (model(**b).loss, None), batch, step, first_micro_batch=True)
            loss.backward()  # .grad sums g v over the draws
    finally:
        rule.remove()
    mean = torch.cat([p.grad.flatten() for p in parameters]) / draws
    cosine = float(torch.nn.functional.cosine_similarity(mean, true, dim=0))
    assert cosine > 0.5, cosine
    assert float(mean.norm()) < 3 * float(true.norm())  # the right scale: E[g v] is grad L itself


def test_a_loss_the_tangents_cannot_reach_is_refused(tmp_path):
    model = tiny_gpt2()
    args = make_trainer(tmp_path, tiny_gpt2()).args
    rule = RULES["fg"](model, args)
    batch = {"input_ids": IDS[:2], "labels": IDS[:2]}
    with pytest.raises(RuntimeError, match="without calling that model"):
        rule.training_forward(lambda b: (torch.tensor(1.0), None), batch, step=0, first_micro_batch=True)
    with pytest.raises(RuntimeError, match="the training loss carries no tangent"):
        rule.training_forward(lambda b: (model(**b).loss.detach(), None), batch, step=0, first_micro_batch=True)
    with pytest.raises(RuntimeError, match="the training loss carries no tangent"):
        rule.training_forward(lambda b: (model(**b).logits.detach().logsumexp(-1).mean(), None), batch, step=0,
                              first_micro_batch=True)
    # The parameters came back, tied as they were, and the model trains again as the rule trains it.
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    loss, _ = rule.training_forward(lambda b: (model(**b).loss, None), batch, step=0, first_micro_batch=True)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    rule.remove()


def test_runs_are_deterministic_and_resume_bitwise(tmp_path):
    """Two identical runs (dropout on) end bit for bit equal; a run resumed from its step-3 checkpoint ends where the
    uninterrupted one does, bit for bit (the Trainer's saved random state and the step-derived seeds)."""
    settings = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = make_trainer(tmp_path / "full", gpt2_with_dropout(), **settings)
    full.train()
    again = make_trainer(tmp_path / "again", gpt2_with_dropout(), **settings)
    again.train()
    resumed = make_trainer(tmp_path / "resumed", gpt2_with_dropout(seed=5), **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    initial = dict(gpt2_with_dropout().named_parameters())
    for (name, p), q, r in zip(full.model.named_parameters(), again.model.parameters(), resumed.model.parameters()):
        assert not torch.equal(p, initial[name]), name  # it trained
        assert torch.equal(p, q) and torch.equal(p, r), name


def test_checkpointing_changes_nothing(tmp_path):
    """The forward runs without autograd, so gradient checkpointing recomputes nothing: the same weights, bitwise."""
    plain, checkpointed = gpt2_with_dropout(), gpt2_with_dropout()
    make_trainer(tmp_path / "plain", plain, max_steps=2).train()
    make_trainer(tmp_path / "checkpointed", checkpointed, max_steps=2, activation_checkpointing=True).train()
    assert checkpointed.is_activation_checkpointing
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(p, q), name


def test_refuses_what_has_no_meaning_for_it(tmp_path, caplog):
    trainer = make_trainer(tmp_path, tiny_gpt2())
    with pytest.raises(ValueError, match="rule='fg' has no feedback points to audit: it has no feedback points"):
        trainer.audit_locality()
    with pytest.raises(ValueError, match="rule='fg' has no alignment probe .*no error is projected"):
        make_trainer(tmp_path, tiny_gpt2(), alignment_probe_steps=1)
    with pytest.raises(ValueError, match="block_lr_scale=0.5 but rule 'fg' has no blocks"):
        make_trainer(tmp_path, tiny_gpt2(), block_lr_scale=0.5).train()
    with caplog.at_level("WARNING", logger="grape_hf.rules.random_direction"):
        make_trainer(tmp_path, tiny_gpt2(), max_grad_norm=1.0)
    assert "clipping rescales nearly every step" in caplog.text
