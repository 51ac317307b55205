"""Observers leave the run they observe bitwise as it would be (issue 24).

Each test trains the same model twice on the same data, once with an observer and once without, and
asks `torch.equal` of every weight and buffer and of the rule's feedback state (matrices; GrAPE's smoothed
targets and perturbation generator). The observers: the alignment probe (`alignment_probe_steps`: the
true-alignment pass, and DFA's/DRTP's measuring-only Jacobian estimate), `GrapeTrainer.audit_locality()`
between training steps, and evaluation during training.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from grape_hf import GrapeTrainer
from grape_hf.models import build_image_model
from tests.tiny_models import image_dataset, quick_args, tiny_gpt2, tiny_vit, token_dataset

STEPS = 4


def dropout_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """`tiny_gpt2` with dropout 0.2 everywhere: an observer that drew from training's random numbers shows."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.2,
                                      embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=0, eos_token_id=0))


def gpt2(attention: str, dropout: bool, seed: int = 5) -> GPT2LMHeadModel:
    model = dropout_gpt2(seed) if dropout else tiny_gpt2(seed=seed)
    model.set_attn_implementation(attention)
    return model


def batch_norm_cnn(seed: int = 0):
    """A CNN with BatchNorm: a forward in training mode moves its running statistics."""
    torch.manual_seed(seed)
    return build_image_model("cnn", 5, 3, 16, conv_channels=[[4], [4]], hidden_sizes=[8], padding=2,
                             batch_norm=True)


def trained(tmp_path, model, dataset, callbacks=(), eval_dataset=None, **kwargs) -> tuple[GrapeTrainer, dict]:
    """Train `model` STEPS steps; returns the trainer and its state: every weight and buffer
    (`model.<name>`) and the rule's feedback state (`feedback.<key>`)."""
    args = quick_args(tmp_path, max_steps=STEPS, **kwargs)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                           callbacks=list(callbacks))
    for callback in callbacks:
        callback.trainer = trainer
    trainer.train()
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"feedback.{k}": v.clone() for k, v in trainer.feedback.state_dict().items()})
    return trainer, state


def assert_bitwise_equal(observed: dict, plain: dict) -> None:
    """Every weight, buffer and feedback entry the plain run has is bitwise the observed run's (DFA's probe adds
    its own generator state, which the plain run does not have)."""
    assert any(k.startswith("feedback.matrices.") for k in plain)
    differ = [k for k in plain if not torch.equal(observed[k], plain[k])]
    assert not differ, f"{len(differ)} of {len(plain)} tensors differ, e.g. {differ[:5]}"


# 1. The alignment probe ----------------------------------------------------------------------------------------
NORMAL, UNIFORM = dict(feedback_init="normal"), dict(feedback_init="uniform")  # random feedback, named
PROBED = {  # name -> (model, dataset, arguments, alignment_probe_steps); each compared with the run without the probe
    "dfa-macro-sdpa": (lambda: gpt2("sdpa", False), token_dataset, dict(rule="dfa", setting="macro", **NORMAL), 1),
    "dfa-micro-sdpa-identity": (lambda: gpt2("sdpa", False), token_dataset,
                                dict(rule="dfa", setting="micro", feedback_init="identity"), 2),
    "dfa-macro-eager-dropout": (lambda: gpt2("eager", True), token_dataset,
                                dict(rule="dfa", setting="macro", **UNIFORM), 3),
    "dfa-micro-sdpa-dropout": (lambda: gpt2("sdpa", True), token_dataset,
                               dict(rule="dfa", setting="micro", **NORMAL), 1),
    "dfa-accumulation-sdpa": (lambda: gpt2("sdpa", False), token_dataset,
                              dict(rule="dfa", per_device_train_batch_size=2, gradient_accumulation_steps=2, **NORMAL),
                              1),
    "dfa-label-smoothing": (lambda: gpt2("sdpa", False), token_dataset, dict(rule="dfa", label_smoothing_factor=0.1),
                            2),
    "drtp-vit-sdpa": (lambda: tiny_vit(seed=3), image_dataset, dict(rule="drtp", **NORMAL), 2),
    "drtp-batch-norm": (batch_norm_cnn, image_dataset, dict(rule="drtp", setting="micro"), 1),
    "grape-every-2-dropout": (lambda: gpt2("sdpa", True), token_dataset,
                              dict(rule="grape", grape_update_steps=2, grape_smoothing="cma"), 1),
    "grape-every-2-eager-accumulation": (lambda: gpt2("eager", False), token_dataset,
                                         dict(rule="grape", grape_update_steps=2, grape_smoothing="ema",
                                              per_device_train_batch_size=2, gradient_accumulation_steps=2), 3),
    "grape-batch-norm": (batch_norm_cnn, image_dataset,
                         dict(rule="grape", setting="micro", grape_update_steps=2, grape_smoothing="cma"), 2),
}


@pytest.mark.parametrize("case", PROBED)
def test_the_probe_leaves_training_bitwise_unchanged(case, tmp_path):
    """With `alignment_probe_steps` on, every rule trains bitwise the weights (and buffers, and feedback) it
    trains with it off: DFA's cos(B_k, T_k) comes from a forward of its own, not from the training forward."""
    build, data, kwargs, probe = PROBED[case]
    _, plain = trained(tmp_path / "plain", build(), data(), **kwargs)
    probed, observed = trained(tmp_path / "probed", build(), data(), alignment_probe_steps=probe, **kwargs)
    assert_bitwise_equal(observed, plain)
    logged = [entry for entry in probed.state.log_history if "true_alignment/mean" in entry]
    assert len(logged) == len(range(0, STEPS, probe))  # the probe did measure, at each probed step
    if kwargs["rule"] != "grape":  # and DFA's measuring estimate (GrAPE logs its training estimates')
        assert all("alignment/mean" in entry for entry in logged)


def test_the_probe_logs_dfa_alignment_from_its_estimate(tmp_path):
    """DFA's `alignment/<point>` still comes at every probed step, one per point, a cosine."""
    probed, _ = trained(tmp_path, gpt2("sdpa", False), token_dataset(), rule="dfa", alignment_probe_steps=2,
                        **NORMAL)
    logged = [entry for entry in probed.state.log_history if "alignment/mean" in entry]
    assert [entry["step"] for entry in logged] == [1, 3]
    assert probed.feedback.estimator.estimates_seen == 2
    for entry in logged:
        cosines = [entry[f"alignment/{p}"] for p in probed.feedback.point_names]
        assert all(-1 <= c <= 1 for c in cosines) and any(c != 0 for c in cosines)


# 2. The locality audit between training steps -------------------------------------------------------------------
class AuditEveryStep(TrainerCallback):
    """`trainer.audit_locality()` (on the first training batch) after every optimizer step."""

    trainer: GrapeTrainer

    def __init__(self):
        self.reports = 0

    def on_step_end(self, args, state, control, **kwargs):
        assert self.trainer.audit_locality().ok
        self.reports += 1


AUDITED = {
    "dfa-dropout": (lambda: gpt2("sdpa", True), token_dataset, dict(rule="dfa")),
    "grape-dropout-accumulation": (lambda: gpt2("sdpa", True), token_dataset,
                                   dict(rule="grape", per_device_train_batch_size=2, gradient_accumulation_steps=2)),
    "grape-probe-batch-norm": (batch_norm_cnn, image_dataset, dict(rule="grape", setting="micro",
                                                                   alignment_probe_steps=2)),
}


@pytest.mark.parametrize("case", AUDITED)
def test_the_audit_between_steps_leaves_training_bitwise_unchanged(case, tmp_path):
    build, data, kwargs = AUDITED[case]
    _, plain = trained(tmp_path / "plain", build(), data(), **kwargs)
    audit = AuditEveryStep()
    _, observed = trained(tmp_path / "audited", build(), data(), callbacks=[audit], **kwargs)
    assert audit.reports == STEPS
    assert_bitwise_equal(observed, plain)


# 3. Evaluation during training ---------------------------------------------------------------------------------
EVALUATED = {
    "dfa-dropout": (lambda: gpt2("sdpa", True), token_dataset, dict(rule="dfa", alignment_probe_steps=2)),
    "grape-dropout": (lambda: gpt2("sdpa", True), token_dataset, dict(rule="grape")),
    "drtp-batch-norm": (batch_norm_cnn, image_dataset, dict(rule="drtp")),
}


@pytest.mark.parametrize("case", EVALUATED)
def test_evaluation_during_training_leaves_training_bitwise_unchanged(case, tmp_path):
    build, data, kwargs = EVALUATED[case]
    _, plain = trained(tmp_path / "plain", build(), data(), **kwargs)
    evaluated, observed = trained(tmp_path / "evaluated", build(), data(), eval_strategy="steps", eval_steps=1,
                                  eval_dataset=data(), per_device_eval_batch_size=4, **kwargs)
    assert_bitwise_equal(observed, plain)
    assert len([entry for entry in evaluated.state.log_history if "eval_loss" in entry]) == STEPS
