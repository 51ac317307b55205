"""Data parallelism: two real gloo processes of batch b train as one process of batch 2b.

The test launches this file with `accelerate launch --multi_gpu --num_processes 2` (the worker
below, `python test_distributed.py OUT`), which trains DFA and GrAPE in one launch and writes, per
process, every batch it saw, the feedback state after every step and the final weights. The
test compares the two processes with each other (bitwise: identical feedback on every process
at every step) and with a one-process run of batch 2b (within float tolerance: the sums of the
all-reduces run in another order).
"""

import os
import sys

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, default_data_collator

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from launch import launched_folder
from tiny_models import VOCAB, tiny_gpt2

PROCESSES, BATCH, STEPS = 2, 2, 3
GRAPE = dict(rule="grape", setting="micro", grape_lr=0.1, grape_smoothing="ema", grape_track_scale=True,
             grape_estimate_stride=1)
RULES = {"dfa": dict(rule="dfa", setting="micro"), "grape": GRAPE,
         # The estimate on every 2nd row, in a forward of its own without autograd (not the DDP-wrapped forward's
         # graph), with the residual estimator: still one process of the whole batch, the batch being divisible.
         "grape_rows": dict(GRAPE, grape_estimate_stride=2, grape_estimator="residual")}


class Recorder(TrainerCallback):
    """Collates batches (remembering their input_ids) and keeps the feedback state after every step."""

    def __init__(self):
        self.trainer = None
        self.batches: list[torch.Tensor] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def __call__(self, features):
        batch = default_data_collator(features)
        self.batches.append(batch["input_ids"].clone())
        return batch

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append({k: v.detach().cpu().clone() for k, v in self.trainer.feedback.state_dict().items()
                            if not k.endswith("generator")})


def train(rule: str, batch_size: int, output_dir: str) -> dict[str, torch.Tensor]:
    """Train `rule` for STEPS SGD steps; returns the batches seen, the feedback after each step and the
    final weights as one flat dict (`batch.<i>`, `step<s>.<key>`, `weights.<name>`)."""
    recorder = Recorder()
    ids = torch.randint(0, VOCAB, (PROCESSES * BATCH * STEPS, 16), generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = GrapeTrainingArguments(output_dir=output_dir, report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, seed=0, optim="sgd", learning_rate=0.1, max_steps=STEPS,
                                  per_device_train_batch_size=batch_size, logging_steps=1, **RULES[rule])
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=data, data_collator=recorder,
                           callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    record = {f"batch.{i}": batch for i, batch in enumerate(recorder.batches)}
    for step, state in enumerate(recorder.states):
        record.update({f"step{step}.{key}": value for key, value in state.items()})
    record.update({f"weights.{name}": value.detach().cpu().clone() for name, value in trainer.model.state_dict().items()
                   if name != "lm_head.weight"})  # tied to the token embeddings
    return record


def worker(output: str) -> None:
    """One of the launched processes: train every rule, write `<rule>_rank<r>.safetensors`."""
    from accelerate import PartialState

    for rule in RULES:
        record = train(rule, BATCH, os.path.join(output, f"run_{rule}"))
        state = PartialState()  # the Trainer's (use_cpu: gloo); created before it, it would be a single process
        assert state.num_processes == PROCESSES, f"launched with {state.num_processes} processes"
        save_file({k: v.contiguous() for k, v in record.items()},
                  os.path.join(output, f"{rule}_rank{state.process_index}.safetensors"))
    state.wait_for_everyone()
    state.destroy_process_group()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the worker in PROCESSES real processes (gloo on CPU); the folder of their records."""
    return launched_folder(tmp_path_factory, __file__, PROCESSES)


@pytest.mark.parametrize("rule", list(RULES))
def test_two_processes_match_one_process_of_twice_the_batch(launched, tmp_path, rule):
    ranks = [load_file(str(launched / f"{rule}_rank{rank}.safetensors")) for rank in range(PROCESSES)]
    single = train(rule, PROCESSES * BATCH, str(tmp_path / "single"))

    # Each process saw its slice of the one-process batch: the same samples, split in rank order.
    for step in range(STEPS):
        split = torch.cat([ranks[rank][f"batch.{step}"] for rank in range(PROCESSES)])
        assert split.shape[0] == PROCESSES * BATCH
        assert torch.equal(split, single[f"batch.{step}"]), f"step {step}: the processes saw other samples"

    # Identical feedback on every process after every step (bitwise).
    keys = [key for key in ranks[0] if key.startswith("step")]
    assert keys and ranks[0].keys() == ranks[1].keys()
    assert len({key.split(".")[0] for key in keys}) == STEPS
    for key in keys:
        assert torch.equal(ranks[0][key], ranks[1][key]), key

    # And the same training as one process of batch PROCESSES * BATCH, within float tolerance.
    for key in [k for k in single if k.startswith(("step", "weights."))]:
        torch.testing.assert_close(ranks[0][key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    initial = tiny_gpt2().state_dict()
    for name, value in initial.items():
        if name != "lm_head.weight":  # every parameter moved: the comparison is of real updates
            assert not torch.equal(value, single[f"weights.{name}"]), name
    if rule != "dfa":  # the matrices learned (and identically): the estimate's all-reduce and the slicing worked
        name = "step2.matrices.transformer.h.0.mlp"
        assert not torch.allclose(ranks[0][name], ranks[0]["step0.matrices.transformer.h.0.mlp"])


if __name__ == "__main__":
    worker(sys.argv[1])
