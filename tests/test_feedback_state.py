"""The feedback state is checked on save and on load (issue 10, "Feedback state").

GrAPE skips an update that a non-finite estimate (or an overflow) would make non-finite; a broken
state is never written and `feedback.safetensors` is written whole or not at all; on resume, broken
or missing matrices and aligner entries are refused, naming the entry and the file; a checkpoint of
another number of processes is warned about; DFA's probe state is optional, since the probe only
measures. Every rule's state round-trips.

The runs are 2-step trainings of a tiny MLP (seconds); the refusals load into a fresh trainer with
`load_feedback`, the step `GrapeTrainer._load_from_checkpoint` takes after the Trainer's weights.
"""

import json
import logging
import math
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import grape_hf.checkpoint
from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.checkpoint import FEEDBACK_FILE, load_feedback, save_feedback
from grape_hf.models import MLPConfig, MLPForImageClassification
from grape_hf.rules import RULES

CLASSES = 5
COMMON = dict(report_to="none", use_cpu=True, disable_tqdm=True, seed=0, per_device_train_batch_size=4,
              logging_steps=1, dataloader_num_workers=0)
RUNS = {  # name -> (rule, options)
    "fa": ("fa", {}),
    "pepita": ("pepita", {}),
    "pepita-mirror": ("pepita", {"pepita_mirror_lr": 0.01}),
    "dfa": ("dfa", {}),
    "dfa-probe": ("dfa", {"alignment_probe_steps": 1}),
    "grape": ("grape", {"grape_smoothing": "ema"}),
    "drtp": ("drtp", {}),
}
POINTS = ("layers.0", "layers.1")  # the MLP's feedback points under the direct rules


def mlp(seed: int = 0) -> MLPForImageClassification:
    torch.manual_seed(seed)
    return MLPForImageClassification(MLPConfig(num_channels=1, image_size=4, hidden_size=12, num_hidden_layers=2,
                                               num_labels=CLASSES))


def examples(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def make_trainer(output_dir, run: str, model_seed: int = 0, callbacks=None, **overrides) -> GrapeTrainer:
    rule, options = RUNS[run]
    args = GrapeTrainingArguments(output_dir=str(output_dir), **{**COMMON, "rule": rule, "max_steps": 2,
                                                                 "save_strategy": "no", **options, **overrides})
    return GrapeTrainer(model=mlp(model_seed), args=args, train_dataset=examples(), callbacks=callbacks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`trained(run)`: (trainer, its checkpoint-2 folder) of a 2-step run, made once per module."""
    cache = {}

    def get(run: str):
        if run not in cache:
            output = tmp_path_factory.mktemp(run)
            trainer = make_trainer(output, run, save_strategy="steps", save_steps=2)
            trainer.train()
            cache[run] = trainer, output / "checkpoint-2"
        return cache[run]
    return get


def copied(trained, run: str, tmp_path):
    """A private copy of `run`'s checkpoint folder and the path of its feedback file."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(trained(run)[1], folder)
    return folder, folder / FEEDBACK_FILE


def rewrite(path, tensors=None, drop=(), metadata=None, drop_metadata=()) -> None:
    """Rewrite a feedback file: entries replaced or dropped, header keys replaced or dropped."""
    with safe_open(str(path), "pt") as file:
        header = file.metadata()
    state = load_file(str(path))
    state.update(tensors or {})
    header.update(metadata or {})
    save_file({k: v for k, v in state.items() if k not in drop}, str(path),
              metadata={k: v for k, v in header.items() if k not in drop_metadata})


def load_fresh(tmp_path, run: str, folder, **overrides) -> GrapeTrainer:
    """A fresh trainer of `run` (another initial model) that loads the feedback of `folder`."""
    trainer = make_trainer(tmp_path / "fresh", run, model_seed=5, **overrides)
    load_feedback(trainer.feedback, trainer.args, str(folder))
    return trainer


def batch(n: int = 4) -> dict:
    chosen = examples()[:n]
    return {key: torch.stack([e[key] for e in chosen]) for key in chosen[0]}


# 1. GrAPE skips a non-finite update; a broken state is never written -----------------------------------
class States(TrainerCallback):
    """The feedback state (CPU copies) after every optimizer step."""

    def __init__(self):
        self.trainer = None
        self.states: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append({k: v.detach().cpu().clone() for k, v in self.trainer.feedback.state_dict().items()})


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_grape_skips_an_update_from_a_nonfinite_estimate(tmp_path, caplog, bad):
    """A non-finite estimate in step 2 (one bad batch, or a tangent that overflowed float32) leaves the
    matrices, the smoothed targets and the estimate count as step 1 left them; step 3 updates again;
    the skip is logged as `grape/skipped_updates` and warned about, naming the point."""
    states = States()
    trainer = make_trainer(tmp_path, "grape", max_steps=3, callbacks=[states])
    states.trainer = trainer
    estimator = trainer.feedback.estimator
    clean, calls = estimator.targets, []

    def poisoned(estimate, baselines=None):
        estimates = clean(estimate, baselines)
        calls.append(1)
        if len(calls) == 2:
            target = estimates["layers.1"].clone()
            target[0, 0] = bad
            estimates["layers.1"] = target
        return estimates
    estimator.targets = poisoned
    with caplog.at_level(logging.WARNING, logger="grape_hf"):
        trainer.train()

    first, second, third = states.states
    for key in first:
        if key.startswith(("matrices.", "aligner.targets.", "aligner.estimates_seen")):
            assert torch.equal(first[key], second[key]), f"the skipped update changed {key}"
            assert torch.isfinite(third[key]).all(), key
    assert int(second["aligner.estimates_seen"]) == 1 and int(third["aligner.estimates_seen"]) == 2
    assert not torch.equal(second["matrices.layers.1"], third["matrices.layers.1"])  # the next estimate updates
    skipped = {h["step"]: h.get("grape/skipped_updates") for h in trainer.state.log_history if "loss" in h}
    assert skipped == {1: None, 2: 1.0, 3: None}
    assert re.search(r"skipped this step's feedback update: the Jacobian estimate of the points \['layers.1'\]",
                     caplog.text)


def test_grape_skips_an_update_that_overflows(tmp_path):
    """Finite estimates whose running average overflows float32 ('cma': a difference of two 3e38
    values) skip the update too, leaving the matrices and targets as they were."""
    args = GrapeTrainingArguments(output_dir=str(tmp_path), **{**COMMON, "rule": "grape", "grape_smoothing": "cma"})
    model = mlp()  # the rule holds its model weakly
    rule = RULES["grape"](model, args)
    model(**batch())  # creates the matrices
    rule.targets = {name: torch.full_like(rule.matrices.tensors[name], -3e38) for name in POINTS}
    rule.estimator.estimates_seen = 2  # as `JacobianEstimator.targets` leaves it before the update
    matrices, targets = dict(rule.matrices.tensors), dict(rule.targets)
    assert rule.update({name: torch.full_like(matrices[name], 3e38) for name in POINTS}) is False
    assert all(rule.matrices.tensors[name] is matrices[name] and rule.targets[name] is targets[name]
               for name in POINTS)
    assert rule.estimator.estimates_seen == 1  # the skipped estimate is not counted
    assert rule.pop_logs() == {"grape/skipped_updates": 1.0}
    assert "grape/skipped_updates" not in rule.pop_logs()  # counted per log line


def grape_rule_with_matrices(tmp_path):
    trainer = make_trainer(tmp_path / "run", "grape")
    trainer.model(**batch())
    return trainer


def test_save_refuses_a_nonfinite_matrix_and_writes_nothing(tmp_path):
    trainer = grape_rule_with_matrices(tmp_path)
    good = tmp_path / "checkpoint-1"
    save_feedback(trainer.feedback, trainer.args, str(good))
    before = (good / FEEDBACK_FILE).read_bytes()

    trainer.feedback.matrices.tensors["layers.1"] = torch.full_like(trainer.feedback.matrices.tensors["layers.1"],
                                                                    math.nan)
    for folder in (good, tmp_path / "checkpoint-2"):  # over a good file, and into a new folder
        with pytest.raises(ValueError, match=rf"Not writing {FEEDBACK_FILE} into {re.escape(str(folder))}: the "
                                             r"feedback state entry 'matrices.layers.1' holds \d+ NaN"):
            save_feedback(trainer.feedback, trainer.args, str(folder))
    assert (good / FEEDBACK_FILE).read_bytes() == before
    assert os.listdir(good) == [FEEDBACK_FILE] and os.listdir(tmp_path / "checkpoint-2") == []


def test_feedback_file_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way (a full disk) leaves the previous file whole and no partial file."""
    trainer = grape_rule_with_matrices(tmp_path)
    folder = tmp_path / "checkpoint-1"
    save_feedback(trainer.feedback, trainer.args, str(folder))
    before = (folder / FEEDBACK_FILE).read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half a file")
        raise OSError("No space left on device")
    monkeypatch.setattr(grape_hf.checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_feedback(trainer.feedback, trainer.args, str(folder))
    assert (folder / FEEDBACK_FILE).read_bytes() == before
    assert os.listdir(folder) == [FEEDBACK_FILE]


# 2. Every rule's state round-trips; broken or missing entries are refused on resume ----------------------
@pytest.mark.parametrize("run", list(RUNS))
def test_every_rule_round_trips_with_its_entries_in_the_header(trained, tmp_path, run):
    trainer, folder = trained(run)
    path = folder / FEEDBACK_FILE
    with safe_open(str(path), "pt") as file:
        header, keys = file.metadata(), set(file.keys())
    assert json.loads(header["entries"]) == sorted(keys) and header["processes"] == "1"
    if run == "fa":  # the first layer's input needs no gradient: FA never makes its matrix
        assert "matrices.layers.0.linear" not in keys and "matrices.classifier" in keys
    resumed = load_fresh(tmp_path, run, folder)
    saved = load_file(str(path))
    state = resumed.feedback.state_dict()
    if run == "pepita-mirror":  # PEPITA keeps the restored noise state aside until its next mirroring step
        state["mirror_noise"] = resumed.feedback._noise_state
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[key], saved[key]) for key in saved)


DAMAGES = {
    "nan": (lambda m: torch.full_like(m, math.nan), r"holds \d+ NaN"),
    "inf": (lambda m: m.masked_fill(torch.ones_like(m, dtype=torch.bool).triu(), math.inf), r"holds 0 NaN and \d+ inf"),
    "zeros": (torch.zeros_like, "is all zeros"),
    "int64": (lambda m: (m * 10).to(torch.int64), "is torch.int64, but feedback matrices are float32"),
    "bool": (lambda m: m > 0, "is torch.bool, but"),
    "float16": (lambda m: m.half(), "is torch.float16, but"),
    "bfloat16": (lambda m: m.bfloat16(), "is torch.bfloat16, but"),
    "float64": (lambda m: m.double(), "is torch.float64, but"),
}


@pytest.mark.parametrize("run", ["dfa", "grape"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_refuses_a_broken_matrix(trained, tmp_path, run, damage):
    folder, path = copied(trained, run, tmp_path)
    change, message = DAMAGES[damage]
    rewrite(path, {"matrices.layers.1": change(load_file(str(path))["matrices.layers.1"])})
    trainer = make_trainer(tmp_path / "fresh", run, model_seed=5)
    with pytest.raises(ValueError, match=rf"'matrices.layers.1' in {re.escape(str(path))} {message}"):
        load_feedback(trainer.feedback, trainer.args, str(folder))
    assert trainer.feedback.matrices.tensors == {}  # nothing was restored


MISSING = [  # (run, the entries removed, what the error names)
    ("grape", ["matrices.layers.1"], "matrices.layers.1"),
    ("grape", ["matrices.layers.0", "matrices.layers.1"], "matrices.layers.0"),
    ("grape", ["aligner.generator"], "aligner.generator"),
    ("grape", ["aligner.targets.layers.0"], "aligner.targets.layers.0"),
    ("grape", ["aligner.estimates_seen"], "aligner.estimates_seen"),
    ("dfa-probe", ["aligner.generator"], "aligner.generator"),
    ("dfa", ["matrices.layers.0"], "matrices.layers.0"),
    ("drtp", ["matrices.layers.1"], "matrices.layers.1"),
    ("pepita-mirror", ["matrices.mirror.classifier"], "matrices.mirror.classifier"),
    ("fa", ["matrices.classifier"], "matrices.classifier"),
]


@pytest.mark.parametrize("run, removed, named", MISSING, ids=[f"{r}-{'+'.join(e)}" for r, e, _ in MISSING])
@pytest.mark.parametrize("header", ["lists-entries", "old-file"])
def test_resume_refuses_a_missing_entry(trained, tmp_path, run, removed, named, header):
    """A lost entry is refused, never re-drawn or reset: by the header's list of entries, and in an
    older file without the list by what the rule needs (GrAPE after an estimate: every matrix, target
    and the generator; DFA's probe after an estimate: the generator; the direct rules: every point's
    matrix or none). FA and PEPITA rely on the list (FA's first layer never has a matrix)."""
    if header == "old-file" and run in ("fa", "pepita-mirror"):
        pytest.skip("without the header's list, FA and PEPITA cannot tell a lost matrix from one never made")
    folder, path = copied(trained, run, tmp_path)
    rewrite(path, drop=removed, drop_metadata=("entries", "processes") if header == "old-file" else ())
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{re.escape(named)}"):
        load_fresh(tmp_path, run, folder)


def test_old_files_without_entries_still_load(trained, tmp_path):
    """A file written before the header listed its entries and processes (same format) resumes."""
    folder, path = copied(trained, "grape", tmp_path)
    rewrite(path, drop_metadata=("entries", "processes"))
    resumed = load_fresh(tmp_path, "grape", folder)
    assert torch.equal(resumed.feedback.matrices.tensors["layers.0"], load_file(str(path))["matrices.layers.0"])


# 3. Another number of processes --------------------------------------------------------------------------
@pytest.mark.parametrize("run", ["grape", "dfa"])
def test_resume_with_another_number_of_processes_warns(trained, tmp_path, caplog, run):
    folder, path = copied(trained, run, tmp_path)
    rewrite(path, metadata={"processes": "2"})
    with caplog.at_level(logging.WARNING, logger="grape_hf"):
        load_fresh(tmp_path, run, folder)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("grape_hf")]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "written by a run of 2 processes and this run has 1" in text and "global batch changes" in text
    assert ("GrAPE's perturbations are drawn per global batch" in text) == (run == "grape")

    caplog.clear()  # the same number, or a file without the number: no warning
    for header in ({"processes": "1"}, None):
        rewrite(path, metadata=header, drop_metadata=() if header else ("processes",))
        with caplog.at_level(logging.WARNING, logger="grape_hf"):
            load_fresh(tmp_path, run, folder)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("grape_hf")]


# 4. DFA's probe state is optional ------------------------------------------------------------------------
def test_dfa_probe_checkpoint_resumes_without_the_probe(trained, tmp_path, caplog):
    _, folder = trained("dfa-probe")
    resumed = make_trainer(tmp_path / "resumed", "dfa", model_seed=5, max_steps=3)
    with caplog.at_level(logging.INFO, logger="grape_hf"):
        resumed.train(resume_from_checkpoint=str(folder))
    assert resumed.state.global_step == 3
    assert "holds the alignment probe's state but this run has no probe" in caplog.text
    saved = load_file(str(folder / FEEDBACK_FILE))
    assert resumed.feedback.state_dict().keys() == {f"matrices.{name}" for name in POINTS}
    assert all(torch.equal(resumed.feedback.matrices.tensors[name], saved[f"matrices.{name}"]) for name in POINTS)


def test_dfa_checkpoint_resumes_with_a_fresh_probe(trained, tmp_path, caplog):
    _, folder = trained("dfa")
    resumed = make_trainer(tmp_path / "resumed", "dfa-probe", model_seed=5, max_steps=3)
    with caplog.at_level(logging.INFO, logger="grape_hf"):
        resumed.train(resume_from_checkpoint=str(folder))
    assert "holds no alignment probe state" in caplog.text and "freshly seeded perturbation generator" in caplog.text
    assert int(resumed.feedback.state_dict()["aligner.estimates_seen"]) == 1  # the probe ran once, from scratch
