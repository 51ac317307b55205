"""Nothing trains silently wrong: every way the named rule could quietly not run either works or raises.

Each test below failed (trained something else without a word) before its guard existed.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import image_batch, image_dataset, quick_args, tiny_gpt2, tiny_vit, token_dataset
from transformers import ConvNextConfig, ConvNextForImageClassification, GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutput

from grape_hf import GrapeTrainer, audit_locality
from grape_hf.checkpoint import FEEDBACK_FILE
from grape_hf.diagnostics.audit import UnreachedParametersError


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_torch_compile_is_refused(tmp_path, rule):
    """A compiled graph runs none of the rule's hooks (and one compiled before for the model class is
    reused): compiled DFA trained exactly as compiled BP."""
    with pytest.raises(NotImplementedError, match=r"torch.compile does not work with rule=.*plain backpropagation"):
        GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule=rule, torch_compile=True))
    with pytest.raises(NotImplementedError, match=r"torch.compile does not work"):
        GrapeTrainer(model=torch.compile(tiny_gpt2()), args=quick_args(tmp_path, rule=rule))


def test_a_forward_that_never_reaches_the_tap_raises(tmp_path):
    """A loss computed from the hidden states with the head's weight (as a fused head-and-loss kernel
    does) never calls the head: nothing below it would train."""
    model = tiny_gpt2()

    def fused_forward(input_ids=None, labels=None, **kwargs):
        hidden = model.transformer(input_ids=input_ids).last_hidden_state
        logits = F.linear(hidden, model.lm_head.weight)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    model.forward = fused_forward
    trainer = GrapeTrainer(model=model, args=quick_args(tmp_path, rule="dfa", error_point="head_input"),
                           train_dataset=token_dataset())
    with pytest.raises(RuntimeError, match=r"did not reach the error tap at lm_head:input after its feedback points "
                                           r"\(points left without feedback: \['embeddings', 'transformer.h.0', "
                                           r"'transformer.h.1'\]\)"):
        trainer.train()


def test_a_head_before_the_points_is_refused(tmp_path):
    """head_module='transformer.wte': the tap ran before every point, so 3 of 28 parameters moved."""
    trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="dfa", head_module="transformer.wte"),
                           train_dataset=token_dataset())
    with pytest.raises(RuntimeError, match=r"did not reach the error tap at transformer.wte:input after its feedback "
                                           r"points \(points left without feedback: \['embeddings'"):
        trainer.train()


@pytest.mark.parametrize("placement, unreached", [
    (dict(feedback_modules=["transformer.ln_f"], error_point="head_input"), "transformer.h.0.attn.c_attn.weight"),
    (dict(feedback_modules=["transformer.h.*.attn"]), "transformer.h.0.mlp.c_fc.weight"),
    (dict(setting="micro", feedback_embeddings=False), "transformer.wpe.weight"),
])
def test_placements_that_leave_parameters_untrained_raise(tmp_path, placement, unreached):
    """Every trainable parameter must get a gradient in the first step, or the error names it."""
    trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="dfa", **placement),
                           train_dataset=token_dataset())
    with pytest.raises(UnreachedParametersError, match=rf"no gradient in the first training step: .*{unreached}"
                                                       r".*freeze them"):
        trainer.train()


def test_freezing_what_a_placement_cannot_reach_trains(tmp_path):
    model = tiny_gpt2()
    model.transformer.wpe.requires_grad_(False)  # the fix the error offers
    placement = quick_args(tmp_path, rule="dfa", setting="micro", feedback_embeddings=False)
    trainer = GrapeTrainer(model=model, args=placement, train_dataset=token_dataset())
    trainer.train()


def tiny_convnext() -> ConvNextForImageClassification:
    torch.manual_seed(0)
    return ConvNextForImageClassification(ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                                         num_stages=2, image_size=16, num_labels=5))


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_nested_block_classes_give_one_level(tmp_path, rule):
    """ConvNeXt declares its stages and its layers as blocks; both became points, the stages were idle and
    their downsampling never trained (GrAPE crashed with a bare KeyError). Now the stages are the cuts and
    their layers the points, the downsampling in the first layer's segment."""
    model = tiny_convnext()
    before = copy.deepcopy(model)
    trainer = GrapeTrainer(model=model, args=quick_args(tmp_path, rule=rule), train_dataset=image_dataset())
    assert trainer.feedback.point_names == ("embeddings", "convnext.encoder.stages.0.layers.0",
                                            "convnext.encoder.stages.1.layers.0")
    assert trainer.feedback.placement.cuts == ("convnext.encoder.stages.0", "convnext.encoder.stages.1")
    trainer.train()
    moved = {n for (n, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    assert "convnext.encoder.stages.1.downsampling_layer.1.weight" in moved
    trainer.feedback.remove()
    assert audit_locality(model, image_batch(), quick_args(tmp_path, rule=rule)).ok


def test_bp_on_a_model_with_another_rules_hooks_is_refused(tmp_path):
    model = tiny_gpt2()
    GrapeTrainer(model=model, args=quick_args(tmp_path, rule="dfa"))
    with pytest.raises(RuntimeError, match=r"rule='bp' was asked for, but .* still carries rule 'dfa'"):
        GrapeTrainer(model=model, args=quick_args(tmp_path, rule="bp"))


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_training_after_remove_is_refused(tmp_path, rule):
    """After `feedback.remove()`, DFA trained as BP while its checkpoints and card said DFA."""
    trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule=rule), train_dataset=token_dataset())
    trainer.feedback.remove()
    with pytest.raises(RuntimeError, match=rf"rule '{rule}' was removed from the model"):
        trainer.train()


def test_load_best_model_at_end_restores_the_feedback_too(tmp_path):
    """The weights go back to the best checkpoint; so must GrAPE's matrices and estimates."""
    # greater_is_better with the loss: the worst, an early checkpoint, is "best".
    best_args = quick_args(tmp_path, rule="grape", grape_lr=0.2, grape_smoothing="ema", max_steps=3,
                           eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                           load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = GrapeTrainer(model=tiny_gpt2(), train_dataset=token_dataset(), eval_dataset=token_dataset(8),
                           args=best_args)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-3")
    saved = load_file(os.path.join(best, FEEDBACK_FILE))
    state = trainer.feedback.state_dict()
    for key in (k for k in saved if k.startswith(("matrices.", "aligner.targets."))):
        assert torch.equal(state[key].cpu(), saved[key]), key
    assert int(state["aligner.estimates_seen"]) == int(saved["aligner.estimates_seen"]) < 3


def test_grape_updates_in_every_call_of_train(tmp_path):
    """A second `train()` started its optimizer steps at the step the first ended on, so GrAPE took its
    first step for a later micro-batch and never updated."""
    trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="grape", max_steps=1),
                           train_dataset=token_dataset())
    trainer.train()
    trainer.train()
    assert trainer.feedback.estimator.estimates_seen == 2


def test_the_probe_leaves_the_trained_weights_bitwise_unchanged(tmp_path):
    """The probe's extra forward drew dropout masks from the training RNG (DFA's weights moved by 2e-6)."""
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.3,
                        embd_pdrop=0.3, attn_pdrop=0.3, bos_token_id=0, eos_token_id=0)
    weights = []
    for probe in (0, 1):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
        GrapeTrainer(model=model, args=quick_args(tmp_path, rule="dfa", max_steps=3, alignment_probe_steps=probe),
                     train_dataset=token_dataset()).train()
        weights.append(model.state_dict())
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_a_point_that_outputs_no_tensor_is_named(tmp_path):
    """feedback_modules=['transformer'] crashed inside a hook on a ModelOutput."""
    trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="dfa", feedback_modules=["transformer"]),
                           train_dataset=token_dataset())
    with pytest.raises(TypeError, match=r"Module 'transformer' outputs a BaseModelOutputWithPastAndCrossAttentions, "
                                        r"not a tensor.*feedback_modules"):
        trainer.train()


def test_gradient_checkpointing_enabled_by_hand_is_refused(tmp_path):
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"Gradient checkpointing is on .*does not work with rule='grape'"):
        GrapeTrainer(model=model, args=quick_args(tmp_path, rule="grape"))
    model.gradient_checkpointing_disable()
    trainer = GrapeTrainer(model=model, args=quick_args(tmp_path, rule="grape"), train_dataset=token_dataset())
    model.gradient_checkpointing_enable()  # after the trainer was built
    with pytest.raises(RuntimeError, match=r"Gradient checkpointing is on .*gradient_checkpointing_disable"):
        trainer.train()


def test_drtp_trains_a_model_whose_loss_the_trainer_scales_in_place(tmp_path):
    """transformers' ViT takes loss kwargs, so the stock `compute_loss` does `loss *= ...`; DRTP's loss
    wrapper returned a view and crashed ('Output 0 of LossGrad is a view and is being modified inplace')."""
    trainer = GrapeTrainer(model=tiny_vit(), args=quick_args(tmp_path, rule="drtp"), train_dataset=image_dataset())
    assert trainer.model_accepts_loss_kwargs and trainer.args.average_tokens_across_devices
    trainer.train()
