"""Checkpoints: `feedback.safetensors` beside the Trainer's files, exact resume, plain model, refusals."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.checkpoint import FEEDBACK_FILE
from tiny_models import VOCAB, tiny_gpt2, token_batch

STEPS, SAVE_AT = 6, 3
# 16 samples of batch 4: the checkpoint falls inside the first epoch and the run crosses into the
# second, so resuming must skip the right batches and restore the sampler's RNG.
COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, seed=0, max_steps=STEPS, save_strategy="steps",
              save_steps=SAVE_AT, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-2,
              grape_lr=0.05, dataloader_num_workers=0)
RULE_SETTINGS = {"dfa": dict(rule="dfa", setting="micro", alignment_probe_steps=2),
                 "grape": dict(rule="grape", setting="micro", grape_smoothing="ema", grape_track_scale=True)}


def token_dataset(n: int = 16, length: int = 16) -> Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_trainer(output_dir, model_seed: int = 0, **overrides) -> GrapeTrainer:
    args = GrapeTrainingArguments(output_dir=str(output_dir), **{**COMMON, **overrides})
    return GrapeTrainer(model=tiny_gpt2(seed=model_seed), args=args, train_dataset=token_dataset())


def cpu_state(trainer) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in trainer.feedback.state_dict().items()}


@pytest.fixture(scope="module", params=["dfa", "grape"])
def uninterrupted(request, tmp_path_factory):
    """One run of STEPS steps that checkpoints at SAVE_AT and goes on: (trainer, its output dir)."""
    output = tmp_path_factory.mktemp(f"uninterrupted_{request.param}")
    trainer = make_trainer(output, **RULE_SETTINGS[request.param])
    trainer.train()
    return request.param, trainer, output


def test_checkpoint_holds_feedback_beside_trainer_files(uninterrupted):
    rule, trainer, output = uninterrupted
    checkpoint = output / f"checkpoint-{SAVE_AT}"
    files = set(os.listdir(checkpoint))
    assert {FEEDBACK_FILE, "model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= files
    with safe_open(str(checkpoint / FEEDBACK_FILE), "pt") as file:
        metadata = file.metadata()
        keys = set(file.keys())
    assert metadata["rule"] == rule and metadata["setting"] == "micro"
    assert json.loads(metadata["points"]) == list(trainer.feedback.point_names)
    assert metadata["tap"] == "transformer.ln_f:input"  # error_point="residual", the causal-LM default
    assert {f"matrices.{name}" for name in trainer.feedback.point_names} <= keys
    # Both rules carry an aligner here (GrAPE's, DFA's probe), so the perturbation generator is saved.
    assert {"aligner.generator", "aligner.estimates_seen"} <= keys
    if rule == "grape":
        assert {f"aligner.targets.{name}" for name in trainer.feedback.point_names} <= keys
    # The model file holds the model only (GPT-2's tied lm_head.weight is not written).
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as file:
        assert set(file.keys()) == set(tiny_gpt2().state_dict().keys()) - {"lm_head.weight"}


def test_resume_is_bitwise_exact(uninterrupted, tmp_path):
    rule, full, output = uninterrupted
    checkpoint = str(output / f"checkpoint-{SAVE_AT}")
    saved = load_file(os.path.join(checkpoint, FEEDBACK_FILE))

    # Another initial model and a fresh trainer: everything must come from the checkpoint.
    resumed = make_trainer(tmp_path / "resumed", model_seed=5, **RULE_SETTINGS[rule])
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.state.global_step == STEPS

    full_weights, resumed_weights = full.model.state_dict(), resumed.model.state_dict()
    for key in full_weights:
        assert torch.equal(full_weights[key], resumed_weights[key]), key
    full_state, resumed_state = cpu_state(full), cpu_state(resumed)
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    # The losses after the checkpoint are the same too.
    def late_losses(trainer):
        return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > SAVE_AT]
    assert late_losses(resumed) == late_losses(full) and len(late_losses(full)) == STEPS - SAVE_AT

    name = "transformer.h.0.mlp"
    if rule == "grape":  # the matrices learned before and after the checkpoint: resuming restored, not re-seeded
        initial = make_trainer(tmp_path / "initial", **RULE_SETTINGS[rule])
        initial.model(**token_batch())
        assert not torch.equal(saved[f"matrices.{name}"], initial.feedback.matrices.tensors[name])
        assert not torch.equal(saved[f"matrices.{name}"], full_state[f"matrices.{name}"])
    else:  # DFA's matrices are fixed; the probe's generator moved on
        assert torch.equal(saved[f"matrices.{name}"], full_state[f"matrices.{name}"])
        assert not torch.equal(saved["aligner.generator"], full_state["aligner.generator"])


@pytest.mark.parametrize("uninterrupted", ["grape"], indirect=True)  # one subprocess (~15 s of imports) is enough
def test_saved_model_loads_without_grape_hf(uninterrupted, tmp_path):
    """The checkpoint's model is a plain transformers one: loaded in a process where grape_hf cannot be imported."""
    _, trainer, output = uninterrupted
    checkpoint = output / f"checkpoint-{STEPS}"
    batch = token_batch()
    with torch.no_grad():  # the rule's hooks do nothing without gradients: the trained model's plain forward
        expected = trainer.model(**batch).logits
    save_file({"input_ids": batch["input_ids"], "logits": expected.contiguous()},
              str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["grape_hf"] = None  # any import of grape_hf now fails
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        with torch.no_grad():
            logits = model(input_ids=expected["input_ids"]).logits
        assert type(model).__name__ == "GPT2LMHeadModel", type(model)
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
        assert not any(name.startswith("grape_hf") and sys.modules[name] is not None for name in sys.modules)
        print("plain checkpoint ok")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plain checkpoint ok" in result.stdout


# Refusals ------------------------------------------------------------------------------------------
@pytest.fixture
def grape_checkpoint(uninterrupted, tmp_path):
    """A private copy of a SAVE_AT-step checkpoint (GrAPE's, or DFA's)."""
    rule, _, output = uninterrupted
    copy = tmp_path / "checkpoint"
    shutil.copytree(output / f"checkpoint-{SAVE_AT}", copy)
    return rule, copy


def resume(checkpoint, tmp_path, **settings):
    make_trainer(tmp_path / "resume", model_seed=5, **settings).train(resume_from_checkpoint=str(checkpoint))


def test_missing_feedback_file_is_refused(grape_checkpoint, tmp_path):
    rule, checkpoint = grape_checkpoint
    os.remove(checkpoint / FEEDBACK_FILE)
    with pytest.raises(FileNotFoundError, match=f"has no {FEEDBACK_FILE}.*rule='{rule}'"):
        resume(checkpoint, tmp_path, **RULE_SETTINGS[rule])


def test_corrupted_feedback_file_is_refused(grape_checkpoint, tmp_path):
    rule, checkpoint = grape_checkpoint
    path = checkpoint / FEEDBACK_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a write cut short
    with pytest.raises(ValueError, match="not a readable safetensors file.*damaged"):
        resume(checkpoint, tmp_path, **RULE_SETTINGS[rule])


@pytest.mark.parametrize("change, message", [
    ("rule", "written with rule="),
    ("setting", "written with setting=micro but this run has setting=macro"),
    ("bp", "was trained with rule=.* but this run has rule='bp'"),
])
def test_mismatched_settings_are_refused(grape_checkpoint, tmp_path, change, message):
    rule, checkpoint = grape_checkpoint
    settings = dict(RULE_SETTINGS[rule])
    if change == "rule":
        settings = dict(RULE_SETTINGS["dfa" if rule == "grape" else "grape"])
    elif change == "setting":
        settings["setting"] = "macro"
    else:
        settings = dict(rule="bp")
    with pytest.raises(ValueError, match=message):
        resume(checkpoint, tmp_path, **settings)


def test_mismatched_matrix_shape_is_refused(grape_checkpoint, tmp_path):
    rule, checkpoint = grape_checkpoint
    path = str(checkpoint / FEEDBACK_FILE)
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    name = "transformer.h.1.attn"
    tensors[f"matrices.{name}"] = torch.ones(48, 32)  # as if written for a wider model
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=rf"'{name}' needs a 32x32 matrix but .*{FEEDBACK_FILE} holds a \(48, 32\)"):
        resume(checkpoint, tmp_path, **RULE_SETTINGS[rule])
