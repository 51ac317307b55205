"""Sequence classifiers on dynamically padded batches: a point (batch, positions, d) under an error
(batch, classes) gets one `B_k e` broadcast over its real positions (1/m each, none on padding), so
every batch length works, under DFA, GrAPE and DRTP."""

import copy
import math

import datasets
import pytest
import torch
from tiny_models import quick_args
from tokenizers import Tokenizer, models
from transformers import (BertConfig, BertForSequenceClassification, DataCollatorWithPadding, GPT2Config,
                          GPT2ForSequenceClassification, ModernBertConfig, ModernBertForSequenceClassification,
                          PreTrainedTokenizerFast)

from grape_hf import GrapeTrainer, audit_locality
from grape_hf.direct.estimate import estimating_forward, jacobian_estimate
from grape_hf.rules import RULES

VOCAB, LABELS, PAD = 64, 3, 0
LENGTHS = (10, 7, 4, 9)  # the real tokens of `padded_batch`'s examples


def tiny_bert(seed: int = 0, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        num_labels=LABELS, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=PAD))


def tiny_gpt2_classifier(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, num_labels=LABELS, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=1, eos_token_id=1))


def tiny_modernbert(seed: int = 0) -> ModernBertForSequenceClassification:
    torch.manual_seed(seed)
    return ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=LABELS, max_position_embeddings=32, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2, classifier_pooling="mean", global_attn_every_n_layers=1,
        embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0))


def padded_batch(lengths=LENGTHS, extra_padding: int = 0, seed: int = 1) -> dict:
    """Right-padded (batch, max(lengths) + extra_padding) token ids, their attention mask and class labels."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_padding
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (len(lengths),), generator=g)}


def collator() -> DataCollatorWithPadding:
    """transformers' dynamic-padding collator, with a word-level tokenizer built here (no download)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": PAD, "[UNK]": 1},
                                                                                     unk_token="[UNK]")),
                                        pad_token="[PAD]", unk_token="[UNK]")
    return DataCollatorWithPadding(tokenizer)


def varied_dataset(n: int = 16, seed: int = 0) -> datasets.Dataset:
    """`n` examples of 3 to 14 random tokens (unpadded) with class labels."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(3, 15, (1,), generator=g)),),
                                        generator=g).tolist(), "label": i % LABELS} for i in range(n)]
    return datasets.Dataset.from_list(rows)


FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2_classifier, "modernbert": tiny_modernbert}
# GPT2ForSequenceClassification scores every position and pools the last token after its head, so its
# error (batch, positions, classes) shares the points' positions: no broadcast there; DRTP puts its target
# at the pooled position (where the error is not zero).
CASES = [(f, r, None) for f in FAMILIES for r in ("dfa", "grape", "drtp")]
CASES += [("bert", "dfa", "head_input"), ("bert", "grape", "head_input")]  # the pooled (batch, d) as the error


@pytest.mark.parametrize("family, rule, error_point", CASES)
def test_classifier_trains_on_dynamically_padded_batches(family, rule, error_point, tmp_path):
    model = FAMILIES[family]()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = quick_args(tmp_path, rule=rule, max_steps=3, learning_rate=1e-3, error_point=error_point)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=varied_dataset(), data_collator=collator())
    widths = {batch["input_ids"].shape[1] for batch in trainer.get_train_dataloader()}
    assert len(widths) > 1, widths  # the batches really differ in length

    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    head = trainer.feedback.head
    unmoved = [name for name, p in model.named_parameters()
               if not name.startswith(head) and torch.equal(p.detach(), before[name])]
    assert not unmoved, unmoved
    d = model.config.hidden_size
    shapes = {tuple(m.shape) for m in trainer.feedback.matrices.tensors.values()}
    # Broadcast (bert, modernbert) or per position (gpt2): never sized by a batch's length.
    assert shapes == {(d, d if error_point == "head_input" else LABELS)}, shapes
    assert audit_locality(FAMILIES[family](), padded_batch(), quick_args(tmp_path, rule=rule,
                                                                          error_point=error_point)).ok


@pytest.mark.parametrize("family", ["bert", "gpt2", "modernbert"])
def test_padding_changes_no_gradient(family, tmp_path):
    """The same examples padded to two widths get the same DFA gradients: no feedback reaches padding,
    and each example's feedback is scaled by its own real length, not the batch's."""
    grads = []
    for extra in (0, 5):
        model = FAMILIES[family]()
        RULES["dfa"](model, quick_args(tmp_path, rule="dfa"))
        model(**padded_batch(extra_padding=extra)).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_feedback_is_broadcast_with_the_length_scale(tmp_path):
    """The embeddings point's feedback: the same vector at every real position of an example, 1/m of
    `B e`, zero on padding."""
    model = tiny_bert()
    rule = RULES["dfa"](model, quick_args(tmp_path, rule="dfa"))
    batch = padded_batch()
    with rule.observing() as observation:
        logits = model(**batch).logits
    error = torch.randn_like(logits)
    feedback = observation.feedback(error)["embeddings"]
    matrix = rule.matrices.tensors["embeddings"]
    for row, n in enumerate(LENGTHS):
        expected = (matrix @ error[row]) / n
        torch.testing.assert_close(feedback[row, :n], expected.expand(n, -1))
        assert not feedback[row, n:].any()


def test_old_flattened_matrix_is_refused(tmp_path):
    """A checkpoint matrix of the old layout (one row per position and feature) names the change and the fix."""
    model = tiny_bert()
    rule = RULES["dfa"](model, quick_args(tmp_path, rule="dfa"))
    batch = padded_batch()
    width = batch["input_ids"].shape[1]
    rule.matrices.load_state_dict({"embeddings": torch.randn(width * 32, LABELS)}, source="old/feedback.safetensors")
    with pytest.raises(ValueError, match=r"'embeddings' needs a 32x3 matrix, broadcast over its positions, but "
                                         r"old/feedback.safetensors holds a \(320, 3\) one.*start a fresh run"):
        model(**batch)


def _logits_of_point(model, block: str, on_input: bool, batch: dict):
    """(h, f): the tensor at block `block`'s input (`on_input`) or output in `model(**batch)`, and the
    logits as a function of it, the rest of the plain forward recomputed from it."""
    module, recorded = model.get_submodule(block), []
    if on_input:
        handle = module.register_forward_pre_hook(lambda m, a: recorded.append(a[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: recorded.append(o[0] if isinstance(o, tuple) else o))
    model(**batch)
    handle.remove()

    def logits_of(h):
        if on_input:
            replace = module.register_forward_pre_hook(lambda m, a: (h, *a[1:]))
        else:
            replace = module.register_forward_hook(lambda m, a, o: (h, *o[1:]) if isinstance(o, tuple) else h)
        try:
            return model(**batch).logits
        finally:
            replace.remove()
    return recorded[0].detach(), logits_of


def _seeded_draw(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return lambda name, like: torch.randn(like.shape, generator=generator, dtype=like.dtype)


def test_broadcast_estimate_is_unbiased(tmp_path):
    """Averaged over draws, GrAPE's T_k of a broadcast point approaches the sum over the example's real
    positions n of (dz/dh_k,n)^T, the target its B_k is fitted to (padding perturbed but not counted)."""
    model = tiny_bert(layers=1)
    plain = copy.deepcopy(model)
    rule = RULES["grape"](model, quick_args(tmp_path, rule="grape"))
    single = padded_batch(lengths=(5,), extra_padding=3)
    batch = {k: v.repeat(256, *([1] * (v.dim() - 1))) for k, v in single.items()}
    sums = {}
    for seed in range(20):
        with estimating_forward(rule.network, model, _seeded_draw(seed)) as estimate:
            model(**batch)
        for name, u in estimate.perturbations.items():
            sums[name] = sums.get(name, 0) + jacobian_estimate(u, estimate.tangent, estimate.positions[name])

    for name, on_input in (("embeddings", True), ("bert.encoder.layer.0", False)):
        h, logits_of = _logits_of_point(plain, "bert.encoder.layer.0", on_input, single)
        jacobian = torch.autograd.functional.jacobian(logits_of, h)  # (1, C, 1, T, d)
        truth = jacobian[0, :, 0, :5, :].sum(1).T  # summed over the 5 real positions: (d, C)
        cos = torch.nn.functional.cosine_similarity(sums[name].flatten(), truth.flatten(), dim=0)
        assert sums[name].shape == (32, LABELS)
        assert cos > 0.95, (name, float(cos))


def test_drtp_target_sits_at_the_pooled_position(tmp_path):
    """GPT-2's classifier reads its logits at each row's last real token: DRTP's target goes there only."""
    from grape_hf.rules.drtp import Target

    error = torch.zeros(2, 5, LABELS)
    error[0, 2], error[1, 4] = 0.3, -0.1  # the pooled positions of rows of 3 and 5 real tokens
    signal = Target(torch.tensor([1, 0]))(error)
    expected = torch.zeros(2, 5, LABELS)
    expected[0, 2, 1], expected[1, 4, 0] = 0.5, 0.5  # one-hot / N
    torch.testing.assert_close(signal, expected)

