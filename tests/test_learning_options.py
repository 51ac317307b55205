"""The options that make the feedback rules learn language models (README, learning): the error read on
the residual stream, identity feedback, and slower blocks."""

import copy

import pytest
import torch
from tiny_models import quick_args, tiny_gpt2, tiny_llama, token_batch, token_dataset

from grape_hf import GrapeTrainer, audit_locality
from grape_hf.direct.matrices import FeedbackMatrices, position_weights


@pytest.mark.parametrize("rule", ["dfa", "grape"])
@pytest.mark.parametrize("setting", ["macro", "micro"])
@pytest.mark.parametrize("make_model, norm", [(tiny_gpt2, "transformer.ln_f"), (tiny_llama, "model.norm")])
def test_residual_error_point_taps_the_final_norm_and_keeps_locality(tmp_path, rule, setting, make_model, norm):
    a = quick_args(tmp_path, rule=rule, setting=setting, error_point="residual")
    trainer = GrapeTrainer(model=make_model(), args=a)
    assert trainer.feedback.tap_name == f"{norm}:input"
    trainer.feedback.remove()
    assert audit_locality(make_model(), token_batch(), a).ok


def test_identity_feedback_on_the_residual_stream_gives_the_last_block_its_true_gradient(tmp_path):
    """On a pre-LN stream read before the final norm, the last block's output gradient is the error
    itself: DFA with B = I gives that block exactly BP's gradients."""
    model, batch = tiny_gpt2(), token_batch()
    reference = copy.deepcopy(model)
    GrapeTrainer(model=model, args=quick_args(tmp_path, rule="dfa", error_point="residual", feedback_init="identity"))
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.startswith("transformer.h.1.") or name.startswith(("transformer.ln_f", "lm_head")):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # The embeddings and the first block get feedback, not their true gradient.
    first, true_first = model.transformer.h[0].mlp.c_fc.weight, reference.transformer.h[0].mlp.c_fc.weight
    assert not torch.allclose(first.grad, true_first.grad)


def test_identity_feedback_skips_its_matmul_only_while_the_matrix_is_the_identity():
    """`project` returns `e` itself for B = I (no matmul), exactly what `e @ I.T` gives, and multiplies again as
    soon as the matrix is written into in place or replaced (GrAPE's updates, a loaded state); a loaded identity
    is recognised."""
    matrices = FeedbackMatrices("identity", seed=0)
    matrix = matrices.get("p", 8, 8, torch.device("cpu"))
    error = torch.randn(2, 3, 8)
    assert torch.equal(matrices.project("p", error, error.shape, torch.float32), error @ matrix.T)
    with torch.no_grad():
        matrix[0, 1] = 0.5  # in place: the same tensor object
    assert torch.equal(matrices.project("p", error, error.shape, torch.float32), error @ matrix.T)
    replaced = torch.randn(8, 8)
    matrices.load_state_dict({"p": replaced})
    assert torch.equal(matrices.project("p", error, error.shape, torch.float32), error @ replaced.T)
    matrices.load_state_dict({"p": torch.eye(8)})  # a checkpoint of an identity run skips again
    assert matrices.is_identity("p")
    positions = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # a broadcast point (2, 5, 8), padded
    per_example = torch.randn(2, 8)  # under a per-example error (2, 8)
    expected = (per_example @ torch.eye(8).T).unsqueeze(1) * position_weights(positions).unsqueeze(-1)
    assert torch.equal(matrices.project("p", per_example, torch.Size((2, 5, 8)), torch.float32, positions), expected)
    matrices.tensors["p"] = torch.eye(8) + 1e-3  # as GrAPE's update replaces a matrix
    assert not matrices.is_identity("p")
    normal = FeedbackMatrices("normal", seed=0)
    normal.get("p", 8, 8, torch.device("cpu"))
    assert not normal.is_identity("p")


def test_identity_feedback_needs_points_as_wide_as_the_error(tmp_path):
    trainer = GrapeTrainer(model=tiny_gpt2(), args=quick_args(tmp_path, rule="dfa", feedback_init="identity",
                                                              error_point="logits"), train_dataset=token_dataset(8))
    with pytest.raises(ValueError, match="feedback_init='identity' needs every point as wide as the error"):
        trainer.train()


def test_block_lr_scale_splits_the_optimizer_groups(tmp_path):
    model = tiny_gpt2()
    trainer = GrapeTrainer(model=model, args=quick_args(tmp_path, rule="dfa", block_lr_scale=0.1, weight_decay=0.01),
                           train_dataset=token_dataset(8))
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lr_of[id(model.transformer.h[0].attn.c_attn.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.transformer.h[1].ln_1.weight)] == pytest.approx(1e-3)
    for full in (model.transformer.wte.weight, model.transformer.wpe.weight, model.transformer.ln_f.weight):
        assert lr_of[id(full)] == pytest.approx(1e-2)
    assert len(lr_of) == len(list(model.parameters()))
    assert trainer.create_optimizer() is optimizer  # a second call (a second train()) does not scale again
    assert {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]} == lr_of


def test_block_lr_scale_zero_freezes_the_blocks(tmp_path):
    model = tiny_gpt2()
    before = copy.deepcopy(model)
    frozen = quick_args(tmp_path, rule="dfa", block_lr_scale=0.0)
    GrapeTrainer(model=model, args=frozen, train_dataset=token_dataset(8)).train()
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        assert torch.equal(p, q) == name.startswith("transformer.h."), name


def test_block_lr_scale_is_refused_where_there_are_no_blocks(tmp_path):
    from grape_hf.models import MLPConfig, MLPForImageClassification

    model = MLPForImageClassification(MLPConfig(num_channels=1, image_size=4, hidden_size=8, num_hidden_layers=1,
                                                num_labels=3))
    trainer = GrapeTrainer(model=model, args=quick_args(tmp_path, rule="fa", block_lr_scale=0.1))
    with pytest.raises(ValueError, match=r"block_lr_scale=0.1 but rule 'fa' has no blocks"):
        trainer.create_optimizer()
