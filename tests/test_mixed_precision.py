"""Mixed precision: bf16 autocast; fp16 loss scaling of the feedback and skipped overflow steps.

The fp16 tests install a `torch.amp.GradScaler` on the Trainer's accelerator, the object accelerate
itself builds for fp16 on a GPU: the loss is scaled in `accelerator.backward`, the gradients are
unscaled and checked for inf/nan in the optimizer step, and `optimizer_step_was_skipped` reports
a skip. On CPU (where accelerate builds no scaler) this runs that code path in float32; on a GPU
it runs with `fp16=True` as users do.
"""

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.direct.matrices import FeedbackMatrices
from tiny_models import VOCAB, tiny_gpt2

COMMON = dict(report_to="none", save_strategy="no", disable_tqdm=True, seed=0, optim="sgd", learning_rate=0.1,
              per_device_train_batch_size=4, logging_steps=1, setting="micro")
RULES = {"dfa": dict(rule="dfa"), "grape": dict(rule="grape", grape_lr=0.1, grape_smoothing="ema")}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and its GradScaler need a GPU; the "
                                                                "CPU tests run the same scaler path in float32")


def token_dataset(n: int = 12, length: int = 16) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


FAR_PARAMETER = "transformer.h.0.mlp.c_fc.weight"  # reached by its point's feedback only


class Snapshots(TrainerCallback):
    """After every optimizer step: whether it was skipped, the weights and the feedback state (on CPU);
    before it, the gradient of FAR_PARAMETER as the optimizer step receives it."""

    def __init__(self):
        self.trainer = None
        self.steps: list[dict] = []
        self.grads: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append(self.trainer.model.get_parameter(FAR_PARAMETER).grad.detach().cpu().clone())

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        self.steps.append({
            "skipped": trainer.accelerator.optimizer_step_was_skipped,
            "weights": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
            "feedback": {k: v.detach().cpu().clone() for k, v in trainer.feedback.state_dict().items()
                         if not k.endswith("generator")},
        })


def run(tmp_path, name: str, rule: str, scaler: torch.amp.GradScaler | None = None, steps: int = 3,
        compute_loss_func=None, **kwargs):
    """Train `steps` steps of `rule` with `scaler` installed on the accelerator; returns the Snapshots."""
    snapshots = Snapshots()
    args = GrapeTrainingArguments(output_dir=str(tmp_path / name), max_steps=steps,
                                  **{**COMMON, "use_cpu": True, **RULES[rule], **kwargs})
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=token_dataset(), callbacks=[snapshots],
                           compute_loss_func=compute_loss_func)
    snapshots.trainer = trainer
    if scaler is not None:
        trainer.accelerator.scaler = scaler  # before `prepare`, which hands it to the AcceleratedOptimizer
    trainer.train()
    return snapshots, trainer


class FirstStepOverflows:
    """The causal LM loss, multiplied by 1e37 in the first step: times the loss scale, its gradients
    overflow to inf in float32 (and float16), as a bad batch's would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        self.calls += 1
        return loss * 1e37 if self.calls == 1 else loss


def grad_scaler(device: str) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=10 ** 6)


# bf16 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
def test_bf16_step_matches_float32_step(tmp_path, rule):
    """Under bf16 autocast the feedback is computed in float32 and cast to the point's dtype: the update
    is the float32 one up to bf16 rounding, and the matrices stay float32."""
    full, _ = run(tmp_path, "fp32", rule, steps=1)
    half, trainer = run(tmp_path, "bf16", rule, steps=1, bf16=True)
    initial = tiny_gpt2().state_dict()
    for name, before in initial.items():
        update_full = full.steps[0]["weights"][name] - before
        update_half = half.steps[0]["weights"][name] - before
        assert update_full.norm() > 0, name
        assert (update_half - update_full).norm() <= 0.05 * update_full.norm(), name
    assert all(m.dtype == torch.float32 for m in trainer.feedback.matrices.tensors.values())


# fp16 loss scaling (CPU, float32) ----------------------------------------------------------------------
@pytest.mark.parametrize("rule", list(RULES))
def test_loss_scaling_scales_and_unscales_the_feedback(tmp_path, rule):
    """A scaled loss gives scaled feedback `B (s e)`, which the scaler unscales with the gradients: with a
    power-of-two scale every update is bitwise the unscaled run's. (Were the feedback not scaled with the
    loss, the unscaled updates would be s = 1024 times too small.)"""
    plain, _ = run(tmp_path, "plain", rule, max_grad_norm=0.0)
    scaled, trainer = run(tmp_path, "scaled", rule, max_grad_norm=0.0,
                          scaler=grad_scaler("cpu"))
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 10  # it never overflowed
    # The feedback reached the far segment scaled with the loss (the scaler unscales in the optimizer step) ...
    for plain_grad, scaled_grad in zip(plain.grads, scaled.grads, strict=True):
        assert plain_grad.abs().max() > 0
        assert torch.equal(scaled_grad, plain_grad * 2.0 ** 10)
    # ... and every step, unscaled, is bitwise the plain run's.
    for plain_step, scaled_step in zip(plain.steps, scaled.steps, strict=True):
        assert not scaled_step["skipped"]
        for group in ("weights", "feedback"):
            for key, value in plain_step[group].items():
                assert torch.equal(value, scaled_step[group][key]), (group, key)


def check_overflow_skips_the_feedback_update(snapshots: Snapshots, trainer) -> None:
    skipped, *kept = snapshots.steps
    assert skipped["skipped"] and not any(step["skipped"] for step in kept)
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 9  # backed off once

    # The skipped step left the model and the feedback as they were before it.
    for name, value in tiny_gpt2().state_dict().items():
        assert torch.equal(skipped["weights"][name], value), name
    fresh = FeedbackMatrices(trainer.args.feedback_init, trainer.args.feedback_seed)
    names = trainer.feedback.point_names
    for name in names:
        assert torch.equal(skipped["feedback"][f"matrices.{name}"], fresh.get(name, 32, 32, torch.device("cpu"))), name
    assert not any(key.startswith("aligner.targets.") for key in skipped["feedback"])
    assert int(skipped["feedback"]["aligner.estimates_seen"]) == 0

    # The next steps train and update the feedback as usual.
    last = kept[-1]
    assert int(last["feedback"]["aligner.estimates_seen"]) == len(kept)
    for name in names:
        assert not torch.equal(last["feedback"][f"matrices.{name}"], skipped["feedback"][f"matrices.{name}"]), name
        assert f"aligner.targets.{name}" in last["feedback"]
    assert not torch.equal(last["weights"]["transformer.h.0.mlp.c_fc.weight"],
                           skipped["weights"]["transformer.h.0.mlp.c_fc.weight"])


def test_overflowing_step_skips_its_feedback_update(tmp_path):
    snapshots, trainer = run(tmp_path, "overflow", "grape", scaler=grad_scaler("cpu"),
                             compute_loss_func=FirstStepOverflows())
    check_overflow_skips_the_feedback_update(snapshots, trainer)


# fp16 on a GPU -------------------------------------------------------------------------------------
@CUDA
@pytest.mark.parametrize("rule", list(RULES))
def test_fp16_on_gpu_trains_with_float32_feedback(tmp_path, rule):
    _, trainer = run(tmp_path, "fp16", rule, steps=5, fp16=True, use_cpu=False)
    assert trainer.accelerator.scaler is not None  # accelerate's own scaler
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert all(m.dtype == torch.float32 and m.is_cuda for m in trainer.feedback.matrices.tensors.values())


@CUDA
def test_fp16_on_gpu_overflow_skips_its_feedback_update(tmp_path):
    snapshots, trainer = run(tmp_path, "fp16_overflow", "grape", fp16=True, use_cpu=False,
                             scaler=grad_scaler("cuda"), compute_loss_func=FirstStepOverflows())
    check_overflow_skips_the_feedback_update(snapshots, trainer)
