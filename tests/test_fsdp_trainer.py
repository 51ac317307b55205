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
cases: DFA and GrAPE micro on GPT-2 (full state dicts, blocks resharded after forward), DRTP macro on
ViT with sharded state dicts (`torch.distributed.checkpoint` folders, no `model.safetensors`) and blocks
kept gathered after forward (`reshard_after_forward: False`), GrAPE macro on Llama (untied embeddings).
The first step's `check_reached` must still raise for a parameter no feedback reaches (and only log one
the forward never uses) on a sharded model with gradient accumulation. SGD has momentum because torch's
`set_optimizer_state_dict` (full state dict) cannot load the state of an optimizer that holds no
tensors ("Expected device to be set"), whatever the rule; GrapeTrainer names that failure and its fix
(GUARDS: `stateless_resume`).
"""

import contextlib
import os
import sys

import pytest
import torch
from launch import close, launched_folder
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, image_batch, tiny_gpt2, tiny_llama, tiny_vit

PROCESSES, STEPS, SAVE_STEPS = 2, 4, 2
GRAPE = {"rule": "grape", "grape_lr": 0.1, "grape_smoothing": "ema", "grape_estimate_stride": 1}
SHARDED = "SHARDED_STATE_DICT"
CASES = {  # name: (model, rule arguments, per-device batch, gradient accumulation, fsdp_config beyond version 2):
    # global batch 4 in each
    # DFA as examples/run_wikitext.py runs it: identity feedback, every point handed a view of the one error tensor
    "dfa_micro": ("gpt2", {"rule": "dfa", "setting": "micro", "feedback_init": "identity", "block_lr_scale": 1.0},
                  2, 1, {}),
    "grape_micro": ("gpt2", {**GRAPE, "setting": "micro", "block_lr_scale": 0.5}, 1, 2, {}),
    # accelerate's default wrap policy also wraps ViTEmbeddings and then fails on its patch embeddings inside:
    # name the layers, as a ViT user of accelerate must (tests/test_fsdp.py)
    "drtp_vit_sharded": ("vit", {"rule": "drtp", "setting": "macro"}, 2, 1,
                         {"state_dict_type": SHARDED, "reshard_after_forward": False,
                          "transformer_layer_cls_to_wrap": "ViTLayer"}),
    "grape_llama": ("llama", {**GRAPE, "setting": "macro", "block_lr_scale": 1.0}, 2, 1, {}),
}
BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}
RUNS = ("ddp", "fsdp", "resumed")
GUARDS = {  # sharded, with gradient accumulation (GPT-2, DFA micro)
    # the first step's check (`check_reached`):
    "unreached": {"rule": "dfa", "setting": "micro", "feedback_embeddings": False},  # wpe gets no gradient: raised
    "unused": {"rule": "dfa", "setting": "micro"},  # plus a parameter the forward never uses: only logged
    # SGD without momentum, one step, a full-state-dict checkpoint, resumed: torch's bare assertion, named
    "stateless_resume": {"rule": "dfa", "setting": "micro", "optim_args": None},
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


def make_trainer(run: str, output: str, rule_args: dict, batch: int, accumulation: int, kind: str = "gpt2",
                 fsdp: dict | None = None, model=None):
    """A GrapeTrainer of `run` (see RUNS) on the tiny `kind` model of BUILD (or `model`), STEPS steps of global
    batch PROCESSES * batch * accumulation, SGD with momentum, `fsdp` added to the sharded runs' fsdp_config;
    `rule_args` may override any argument."""
    from datasets import Dataset

    from grape_hf import GrapeTrainer, GrapeTrainingArguments

    rows = PROCESSES * batch * accumulation * STEPS
    if kind == "vit":
        columns = image_batch(rows, seed=1)
    else:
        ids = torch.randint(0, VOCAB, (rows, 16), generator=torch.Generator().manual_seed(1))
        columns = {"input_ids": ids, "labels": ids}
    data = Dataset.from_dict({key: value.tolist() for key, value in columns.items()})
    fsdp = {"version": 2, **(fsdp or {})}
    sharded, resumed = run != "ddp", run == "resumed"
    if resumed:  # another initial model and other feedback: what it ends with must come from the checkpoint
        rule_args = {**rule_args, "feedback_seed": 7}
    args = GrapeTrainingArguments(**{
        "output_dir": output, "report_to": "none", "use_cpu": True, "disable_tqdm": True, "seed": 0, "optim": "sgd",
        "optim_args": "momentum=0.9", "learning_rate": 0.1, "max_steps": STEPS, "logging_steps": 1,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "save_strategy": "steps" if sharded else "no", "save_steps": SAVE_STEPS,
        **({"fsdp": "full_shard", "fsdp_config": fsdp} if sharded else {}), **rule_args})
    with fsdp_on_cpu() if sharded else contextlib.nullcontext():
        trainer = GrapeTrainer(model=model or BUILD[kind](seed=5 if resumed else 0), args=args, train_dataset=data)
    assert trainer.is_fsdp_enabled == sharded and trainer.accelerator.is_fsdp2 == sharded, run
    if sharded:  # the fsdp_config keys reached accelerate's plugin (a misspelt key is silently ignored)
        plugin = trainer.accelerator.state.fsdp_plugin
        assert plugin.reshard_after_forward == fsdp.get("reshard_after_forward", True), plugin.reshard_after_forward
        assert plugin.state_dict_type.name == fsdp.get("state_dict_type", "FULL_STATE_DICT"), plugin.state_dict_type
    return trainer


def train(case: str, run: str, output: str) -> dict[str, torch.Tensor]:
    """Train `case` for STEPS steps as `run` (see RUNS); returns the weights after the last step (`weights.<name>`,
    gathered), the feedback state (`feedback.<key>`) and each parameter's group learning rate (`lr.<name>`)."""
    from torch.distributed.tensor import DTensor

    kind, rule_args, batch, accumulation, fsdp = CASES[case]
    trainer = make_trainer(run, os.path.join(output, f"{case}_{run}"), rule_args, batch, accumulation, kind, fsdp)
    sharded = run != "ddp"
    resume = os.path.join(output, f"{case}_fsdp", f"checkpoint-{SAVE_STEPS}") if run == "resumed" else None
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    lrs = {id(param): group["initial_lr"] for group in trainer.optimizer.param_groups for param in group["params"]}
    record = {}
    for name, param in model.named_parameters():
        if sharded:  # the optimizer holds the sharded parameter, really split across the processes (dim 0)
            assert isinstance(param, DTensor), name
            assert param.shape[0] < PROCESSES or param.to_local().numel() < param.numel(), name
        record[f"weights.{name}"] = (param.full_tensor() if sharded else param).detach().clone()
        record[f"lr.{name}"] = torch.tensor(lrs[id(param)], dtype=torch.float64)
    record.update({f"feedback.{key}": value.detach().cpu().clone()
                   for key, value in trainer.feedback.state_dict().items()})
    trainer.feedback.remove()
    return record


def guards(output: str) -> dict[str, str]:
    """The sharded Trainer's first step (two micro-batches), per GUARDS run; `stateless_resume` saves it and a
    fresh trainer resumes from that checkpoint. Per run: '<error class>: <message>' of what it raised, or '' when
    it trained."""
    from grape_hf.diagnostics.audit import UnreachedParametersError

    raised = {}
    for name, rule_args in GUARDS.items():
        folder, resume = os.path.join(output, f"guard_{name}"), name == "stateless_resume"
        model = tiny_gpt2()
        if name == "unused":
            model.transformer.h[0].mlp.register_parameter("unused", torch.nn.Parameter(torch.ones(4)))
        rule_args = {**rule_args, "max_steps": 1, "save_strategy": "steps" if resume else "no", "save_steps": 1}
        trainer = make_trainer("fsdp", folder, rule_args, 1, 2, model=model)
        try:
            trainer.train()
            if resume:  # torch asserts on both processes, before any collective: no process is left waiting
                trainer.feedback.remove()
                trainer = make_trainer("resumed", folder, {**rule_args, "max_steps": 2}, 1, 2)
                trainer.train(resume_from_checkpoint=os.path.join(folder, "checkpoint-1"))
            raised[name] = ""
        except (UnreachedParametersError, NotImplementedError, AssertionError) as error:
            raised[name] = f"{type(error).__name__}: {error}"
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
    return launched_folder(tmp_path_factory, __file__, PROCESSES)


def records(launched, case: str, run: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(launched / f"{case}_{run}_rank{rank}.safetensors")) for rank in range(PROCESSES)]



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
    initial = dict(BUILD[CASES[case][0]]().named_parameters())
    for name, value in initial.items():  # every parameter moved: the comparison is of real updates
        assert not torch.equal(value, ddp[f"weights.{name}"]), name
    rule_args = CASES[case][1]
    scale = rule_args.get("block_lr_scale", 1.0)
    lrs = {float(ddp[f"lr.{name}"]) for name in initial}
    assert lrs == ({0.1, 0.1 * scale} if scale != 1.0 else {0.1})
    if scale != 1.0:  # the blocks' group kept its parameters through the switch to the sharded ones
        assert float(sharded[0]["lr.transformer.h.0.mlp.c_fc.weight"]) == pytest.approx(0.1 * scale)
        assert float(sharded[0]["lr.transformer.wte.weight"]) == pytest.approx(0.1)
    if rule_args["rule"] == "grape":  # every matrix learned, identically
        assert int(ddp["feedback.aligner.estimates_seen"]) == STEPS
        drawn = initial_feedback(case)
        matrices = [key for key in drawn if key.startswith("feedback.matrices.")]
        assert matrices and all(not torch.equal(ddp[key], drawn[key]) for key in matrices), matrices


def initial_feedback(case: str) -> dict[str, torch.Tensor]:
    """The feedback state a fresh rule of `case` starts from (on its tiny model, before any step)."""
    from grape_hf import GrapeTrainingArguments
    from grape_hf.rules import RULES

    kind, rule_args = CASES[case][:2]
    args = GrapeTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **rule_args)
    model = BUILD[kind]()
    rule = RULES[args.rule](model, args)
    inputs = {"pixel_values": image_batch(1)["pixel_values"]} if kind == "vit" else {
        "input_ids": torch.zeros(1, 4, dtype=torch.long)}
    model(**inputs)  # matrices are drawn when each point first runs
    return {f"feedback.{key}": value.detach().clone() for key, value in rule.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_trainer_resume_is_bitwise(launched, case):
    """Resuming from the FSDP checkpoint (weights, optimizer, scheduler, feedback) continues the run bit for bit."""
    for uninterrupted, resumed in zip(records(launched, case, "fsdp"), records(launched, case, "resumed")):
        assert uninterrupted.keys() == resumed.keys()
        differ = [key for key in uninterrupted if not torch.equal(uninterrupted[key], resumed[key])]
        assert not differ, differ


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_checkpoint_holds_the_run(launched, case, tmp_path):
    """The last checkpoint of the sharded run: the model (with full state dicts the Trainer's model file, a plain
    transformers checkpoint; with sharded ones only the `torch.distributed.checkpoint` folder) and
    feedback.safetensors hold the weights and feedback state the run ended with."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    final = records(launched, case, "fsdp")[0]
    folder = launched / f"{case}_fsdp" / f"checkpoint-{STEPS}"
    if CASES[case][4].get("state_dict_type") == SHARDED:  # one file per process, no full copy anywhere
        assert (folder / "optimizer_0").is_dir() and not (folder / "model.safetensors").exists()
        assert sorted(path.name for path in (folder / "pytorch_model_fsdp_0").glob("*.distcp")) == [
            f"__{rank}_0.distcp" for rank in range(PROCESSES)]
        dcp_to_torch_save(folder / "pytorch_model_fsdp_0", tmp_path / "model.pt")  # gathered, in this process
        weights = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    else:
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


def test_sharded_resume_of_a_stateless_optimizer_names_the_fix(launched):
    """With full state dicts, torch cannot load the state of an optimizer that holds none (plain SGD): GrapeTrainer
    re-raises its bare assertion as an error that names the cause and the fixes."""
    from safetensors import safe_open

    for rank in range(PROCESSES):
        with safe_open(str(launched / f"guards_rank{rank}.safetensors"), "pt") as file:
            raised = file.metadata()["stateless_resume"]
        assert raised.startswith("NotImplementedError: Resuming SGD under FSDP with full state dicts"), raised
        for named in ("'Expected device to be set'", "holds no state tensors", "SGD with momentum",
                      "'state_dict_type': 'SHARDED_STATE_DICT'"):
            assert named in raised, named


if __name__ == "__main__":
    worker(sys.argv[1])
