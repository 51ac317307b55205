"""GrapeTrainer's own FSDP2 path: two real gloo processes, `fsdp="full_shard"`, `fsdp_config={"version": 2}`.

accelerate's `AcceleratorState` sets the FSDP distributed type (and keeps the plugin) only for GPU-like
distributed types; on a CPU-only machine a launch is MULTI_CPU (gloo) and the plugin is dropped, so the
Trainer would silently run plain data parallelism. The worker below removes exactly that device test
(`fsdp_on_cpu`): while it builds a trainer, a MULTI_CPU `AcceleratorState` given a plugin takes the same
two assignments the GPU branch makes (distributed type FSDP, the plugin). Everything after it is
accelerate's and transformers' real code: the Trainer's `prepare` (`fsdp2_prepare_model`: `fully_shard`
on every block, the tail and the root; the optimizer switched to the sharded parameters, `block_lr_scale`'s
groups included), `no_sync` for gradient accumulation, gradient clipping over DTensors, the FSDP checkpoint
(`save_fsdp_model`/`save_fsdp_optimizer`, full state dicts) and its resume (`load_fsdp_model`/
`load_fsdp_optimizer`, `GrapeTrainer._load_from_checkpoint` restoring the feedback state).

The test launches this file with `accelerate launch --multi_gpu --num_processes 2` (CPU: gloo). Per case,
each process trains three runs of the same seeded setup (SGD with momentum, no dropout, same global
batch): plain data parallelism (DDP), the sharded Trainer (a checkpoint every 2 steps), and a sharded
Trainer resumed from the first checkpoint, built from another initial model and `feedback_seed` so that
what it ends with can only come from the checkpoint (weights, momentum, scheduler, data position,
feedback). The sharded weights (gathered) and feedback state after the last step must equal DDP's
within 1e-6 relative, and be the same on both processes; the parameters must keep their
`block_lr_scale` group through the switch to the sharded ones; the resumed run must end bit for bit
where the uninterrupted one does, and the last checkpoint's files hold what the run ended with. The
first step's `check_reached` must still raise for a parameter no feedback reaches (and only log one
the forward never uses) on a sharded model with gradient accumulation. SGD has momentum because torch's
`set_optimizer_state_dict` (full state dict) cannot load the state of an optimizer that holds no
tensors ("Expected device to be set"), whatever the rule.
"""

import contextlib
import os
import sys

import pytest
import torch
from launch import launch_workers
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, tiny_gpt2

PROCESSES, STEPS, SAVE_STEPS = 2, 4, 2
RTOL, ATOL = 1e-6, 1e-9
CASES = {  # name: (rule arguments, per-device batch, gradient accumulation): global batch 4 in each
    "dfa_micro": ({"rule": "dfa", "setting": "micro"}, 2, 1),
    "grape_micro": ({"rule": "grape", "setting": "micro", "grape_lr": 0.1, "grape_smoothing": "ema",
                     "block_lr_scale": 0.5}, 1, 2),
}
RUNS = ("ddp", "fsdp", "resumed")
GUARDS = {  # the first step's check (`check_reached`), sharded, with gradient accumulation
    "unreached": {"rule": "dfa", "setting": "micro", "feedback_embeddings": False},  # wpe gets no gradient: raised
    "unused": {"rule": "dfa", "setting": "micro"},  # plus a parameter the forward never uses: only logged
}


@contextlib.contextmanager
def fsdp_on_cpu():
    """While trainers are built: a MULTI_CPU `AcceleratorState` given an FSDP plugin becomes FSDP, as a GPU one
    would (accelerate's state.py keeps its FSDP branch to GPU-like distributed types). Nothing else changes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP  # the two assignments of the GPU branch
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as the end of __init__ does

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original
        os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by Accelerator for its plugin: no leak into later runs


def make_trainer(run: str, output: str, rule_args: dict, batch: int, accumulation: int, model=None):
    """A GrapeTrainer of `run` (see RUNS) on the tiny GPT-2 (or `model`), STEPS steps of global batch
    PROCESSES * batch * accumulation, SGD with momentum; `rule_args` may override any argument."""
    from datasets import Dataset

    from grape_hf import GrapeTrainer, GrapeTrainingArguments

    ids = torch.randint(0, VOCAB, (PROCESSES * batch * accumulation * STEPS, 16),
                        generator=torch.Generator().manual_seed(1))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    sharded, resumed = run != "ddp", run == "resumed"
    if resumed:  # another initial model and other feedback: what it ends with must come from the checkpoint
        rule_args = {**rule_args, "feedback_seed": 7}
    args = GrapeTrainingArguments(**{
        "output_dir": output, "report_to": "none", "use_cpu": True, "disable_tqdm": True, "seed": 0, "optim": "sgd",
        "optim_args": "momentum=0.9", "learning_rate": 0.1, "max_steps": STEPS, "logging_steps": 1,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "save_strategy": "steps" if sharded else "no", "save_steps": SAVE_STEPS,
        **({"fsdp": "full_shard", "fsdp_config": {"version": 2}} if sharded else {}), **rule_args})
    with fsdp_on_cpu() if sharded else contextlib.nullcontext():
        trainer = GrapeTrainer(model=model or tiny_gpt2(seed=5 if resumed else 0), args=args, train_dataset=data)
    assert trainer.is_fsdp_enabled == sharded and trainer.accelerator.is_fsdp2 == sharded, run
    return trainer


def train(case: str, run: str, output: str) -> dict[str, torch.Tensor]:
    """Train `case` for STEPS steps as `run` (see RUNS); returns the weights after the last step (`weights.<name>`,
    gathered), the feedback state (`feedback.<key>`) and each parameter's group learning rate (`lr.<name>`)."""
    from torch.distributed.tensor import DTensor

    rule_args, batch, accumulation = CASES[case]
    trainer = make_trainer(run, os.path.join(output, f"{case}_{run}"), rule_args, batch, accumulation)
    sharded = run != "ddp"
    resume = os.path.join(output, f"{case}_fsdp", f"checkpoint-{SAVE_STEPS}") if run == "resumed" else None
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    lrs = {id(param): group["initial_lr"] for group in trainer.optimizer.param_groups for param in group["params"]}
    record = {}
    for name, param in model.named_parameters():
        if sharded:  # really split across the processes, and the optimizer holds the sharded parameter
            assert isinstance(param, DTensor) and param.to_local().numel() < param.numel(), name
        record[f"weights.{name}"] = (param.full_tensor() if sharded else param).detach().clone()
        record[f"lr.{name}"] = torch.tensor(lrs[id(param)], dtype=torch.float64)
    record.update({f"feedback.{key}": value.detach().cpu().clone()
                   for key, value in trainer.feedback.state_dict().items()})
    trainer.feedback.remove()
    return record


def guards(output: str) -> dict[str, str]:
    """`check_reached` on the sharded Trainer after its first step (two micro-batches): per GUARDS run, the
    `UnreachedParametersError` it raised, or '' when it trained."""
    from grape_hf.diagnostics.audit import UnreachedParametersError

    raised = {}
    for name, rule_args in GUARDS.items():
        model = tiny_gpt2()
        if name == "unused":
            model.transformer.h[0].mlp.register_parameter("unused", torch.nn.Parameter(torch.ones(4)))
        trainer = make_trainer("fsdp", os.path.join(output, f"guard_{name}"),
                               {**rule_args, "max_steps": 1, "save_strategy": "no"}, 1, 2, model)
        try:
            trainer.train()
            raised[name] = ""
        except UnreachedParametersError as error:
            raised[name] = str(error)
        trainer.feedback.remove()
    return raised


def worker(output: str) -> None:
    """One of the launched processes: every case and run, into `<case>_<run>_rank<r>.safetensors`; the GUARDS
    outcomes into the header of `guards_rank<r>.safetensors`."""
    from accelerate import PartialState

    for case in CASES:
        for run in RUNS:
            record = train(case, run, output)
            state = PartialState()  # the Trainer's (use_cpu: gloo)
            assert state.num_processes == PROCESSES, f"launched with {state.num_processes} processes"
            save_file({k: v.contiguous() for k, v in record.items()},
                      os.path.join(output, f"{case}_{run}_rank{state.process_index}.safetensors"))
    save_file({"ran": torch.ones(1)}, os.path.join(output, f"guards_rank{state.process_index}.safetensors"),
              metadata=guards(output))
    state.wait_for_everyone()
    state.destroy_process_group()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the worker in PROCESSES real processes (gloo on CPU); the folder of their records and checkpoints."""
    output = tmp_path_factory.mktemp("fsdp_trainer")
    launch_workers(__file__, output, PROCESSES)
    return output


def records(launched, case: str, run: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(launched / f"{case}_{run}_rank{rank}.safetensors")) for rank in range(PROCESSES)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """|a - b| <= RTOL |b| + ATOL (Frobenius norms)."""
    return float((a.double() - b.double()).norm()) <= RTOL * float(b.double().norm()) + ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_trainer_matches_data_parallel(launched, case):
    ddp = records(launched, case, "ddp")[0]
    sharded = records(launched, case, "fsdp")
    assert sharded[0].keys() == sharded[1].keys() == ddp.keys()
    for key in sharded[0]:  # the same on both processes (weights gathered; feedback drawn and updated alike)
        assert torch.equal(sharded[0][key], sharded[1][key]), key
    for key, value in ddp.items():
        if value.is_floating_point():
            assert close(sharded[0][key], value), (key, float((sharded[0][key] - value).norm() / value.norm()))
        else:
            assert torch.equal(sharded[0][key], value), key
    initial = dict(tiny_gpt2().named_parameters())
    for name, value in initial.items():  # every parameter moved: the comparison is of real updates
        assert not torch.equal(value, ddp[f"weights.{name}"]), name
    rule_args = CASES[case][0]
    scale = rule_args.get("block_lr_scale", 1.0)
    lrs = {float(ddp[f"lr.{name}"]) for name in initial}
    assert lrs == ({0.1, 0.1 * scale} if scale != 1.0 else {0.1})
    if scale != 1.0:  # the blocks' group kept its parameters through the switch to the sharded ones
        assert float(sharded[0]["lr.transformer.h.0.mlp.c_fc.weight"]) == pytest.approx(0.1 * scale)
        assert float(sharded[0]["lr.transformer.wte.weight"]) == pytest.approx(0.1)
    if rule_args["rule"] == "grape":  # the matrices learned, identically
        assert int(ddp["feedback.aligner.estimates_seen"]) == STEPS
        matrix = "feedback.matrices.transformer.h.0.mlp"
        assert not torch.equal(ddp[matrix], initial_feedback(case)[matrix])


def initial_feedback(case: str) -> dict[str, torch.Tensor]:
    """The feedback state a fresh rule of `case` starts from (on the tiny GPT-2, before any step)."""
    from grape_hf import GrapeTrainingArguments
    from grape_hf.rules import RULES

    args = GrapeTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **CASES[case][0])
    model = tiny_gpt2()
    rule = RULES[args.rule](model, args)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # matrices are drawn when each point first runs
    return {f"feedback.{key}": value.detach().clone() for key, value in rule.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_trainer_resume_is_bitwise(launched, case):
    """Resuming from the FSDP checkpoint (weights, optimizer, scheduler, feedback) continues the run bit for bit."""
    for uninterrupted, resumed in zip(records(launched, case, "fsdp"), records(launched, case, "resumed")):
        assert uninterrupted.keys() == resumed.keys()
        differ = [key for key in uninterrupted if not torch.equal(uninterrupted[key], resumed[key])]
        assert not differ, differ


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_checkpoint_holds_the_run(launched, case):
    """The last checkpoint of the sharded run: the Trainer's model file (a plain transformers checkpoint) and
    feedback.safetensors hold the weights and feedback state the run ended with."""
    final = records(launched, case, "fsdp")[0]
    folder = launched / f"{case}_fsdp" / f"checkpoint-{STEPS}"
    assert (folder / "pytorch_model_fsdp.bin").is_file() and (folder / "optimizer.bin").is_file()
    weights = load_file(str(folder / "model.safetensors"))
    names = [key[len("weights."):] for key in final if key.startswith("weights.")]
    assert set(names) <= set(weights)
    for name in names:
        assert torch.equal(weights[name], final[f"weights.{name}"]), name
    feedback = load_file(str(folder / "feedback.safetensors"))
    assert {f"feedback.{key}" for key in feedback} == {key for key in final if key.startswith("feedback.")}
    for key, value in feedback.items():
        assert torch.equal(value, final[f"feedback.{key}"]), key


def test_sharded_trainer_guards_unreached_parameters(launched):
    """Under FSDP2 gradients reach the sharded parameters only when synced (the step's last micro-batch), and the
    forward computes with the gathered ones: the first step's check still raises for a parameter no feedback
    reaches, and only logs one the forward never uses."""
    from safetensors import safe_open

    for rank in range(PROCESSES):
        with safe_open(str(launched / f"guards_rank{rank}.safetensors"), "pt") as file:
            raised = file.metadata()
        assert "no gradient in the first training step: transformer.wpe.weight." in raised["unreached"]
        assert raised["unused"] == ""


if __name__ == "__main__":
    worker(sys.argv[1])
