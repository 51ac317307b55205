"""FSDP2: two real gloo processes with sharded parameters train as one process of twice the batch.

accelerate's FSDP plugin needs GPUs (on a CPU-only machine `AcceleratorState` keeps the launch as
MULTI_CPU data parallelism and drops the plugin), so the worker below shards the model itself with
torch's `fully_shard`, as accelerate's `fsdp2_prepare_model` does: every block, the input embeddings
when not tied, the final norm with the head (and tied embeddings) without resharding, then the root.
The rule is installed before sharding, as `GrapeTrainer` does. The loop is the Trainer's step:
`Rule.training_forward`, the backward, an SGD step, `Rule.end_step`.

The test launches this file with `accelerate launch --multi_gpu --num_processes 2` (CPU: gloo). Each
process trains every case with `reshard_after_forward` True and False on its half of each batch;
the weights (gathered) and the feedback state after the last step must equal a one-process run of
the full batch within 1e-6 relative, every parameter must have moved, and with resharding each
block's gradients must have been reduced and its parameters freed again before the backward reached
the block below it (FSDP's memory savings kept). A sharded run reloaded after its first step into a
fresh model (`reload`: what resuming restores) must end bit for bit where the uninterrupted one does.
"""

import os
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from launch import close, launched_folder
from tiny_models import VOCAB, image_batch, tiny_gpt2, tiny_llama, tiny_vit

from grape_hf import GrapeTrainingArguments
from grape_hf.diagnostics.probe import true_alignment
from grape_hf.fsdp import fsdp_refusal
from grape_hf.rules import RULES

PROCESSES, BATCH, STEPS, LR = 2, 2, 3, 0.1
GRAPE = {"rule": "grape", "grape_lr": 0.1, "grape_smoothing": "ema", "grape_estimate_stride": 1}
CASES = {  # name: (model, wrapped block classes, rule arguments, micro-batches per step)
    "dfa_micro": ("gpt2", None, {"rule": "dfa", "setting": "micro"}, 1),
    "dfa_macro": ("gpt2", None, {"rule": "dfa", "setting": "macro"}, 1),
    "grape_micro": ("gpt2", None, {**GRAPE, "setting": "micro"}, 1),
    # gradient accumulation: no reduce-scatter on the first micro-batch (set_requires_gradient_sync, as accelerate)
    "grape_accumulated": ("gpt2", None, {**GRAPE, "setting": "micro"}, 2),
    "grape_llama": ("llama", None, {**GRAPE, "setting": "macro"}, 1),
    # the estimate on every 2nd row, in a forward of its own stopped at the tap, through the sharded model
    "grape_rows": ("gpt2", None, {**GRAPE, "setting": "micro", "grape_estimate_stride": 2,
                                  "grape_estimator": "residual"}, 1),
    # accelerate's default policy also wraps ViTEmbeddings and then fails on its patch embeddings inside: name
    # the layers (fsdp_transformer_layer_cls_to_wrap: ViTLayer), as a ViT user of accelerate must.
    "drtp_vit": ("vit", ["ViTLayer"], {"rule": "drtp", "setting": "macro"}, 1),
}
BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}
RESUMED = ("grape_micro", "drtp_vit")  # also trained with a reload of everything after the first step
PROBED = {"dfa_macro"}  # with the true-alignment probe's forward and backward before each training forward


def batches(model: str) -> list[dict]:
    """The STEPS global batches (PROCESSES * BATCH examples each) of a model."""
    if model == "vit":
        return [image_batch(PROCESSES * BATCH, seed=step) for step in range(STEPS)]
    ids = torch.randint(0, VOCAB, (STEPS, PROCESSES * BATCH, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[step], "labels": ids[step].clone()} for step in range(STEPS)]


def shard_like_accelerate(model: torch.nn.Module, reshard: bool, wrap: list[str] | None) -> None:
    """`fully_shard` as accelerate's `fsdp2_prepare_model` applies it (transformer-based wrap policy)."""
    from accelerate.utils.fsdp_utils import _find_final_norm
    from torch.distributed.fsdp import fully_shard

    classes = set(wrap or model._no_split_modules)
    for module in reversed(list(model.modules())[1:]):  # bottom up, as get_module_children_bottom_up
        if type(module).__name__ in classes:
            fully_shard(module, reshard_after_forward=reshard)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embeddings.weight is head.weight
    if not tied:
        fully_shard(embeddings, reshard_after_forward=reshard)
    tail = [m for m in (_find_final_norm(model), *((embeddings,) if tied else ()), head) if m is not None]
    fully_shard(tail, reshard_after_forward=False)
    fully_shard(model)  # the root: torch's default (no resharding after forward)


def reload(case: str, model: torch.nn.Module, rule, reshard: bool):
    """What resuming from a checkpoint restores, within the running process group: the sharded model's full state
    dict (FSDP2's `get_model_state_dict`, gathered) and the rule's state, loaded into a fresh, differently
    initialised model with a fresh rule, sharded again, and a fresh optimizer (SGD holds no state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    full = StateDictOptions(full_state_dict=True)
    weights = get_model_state_dict(model, options=full)
    feedback = {key: value.detach().cpu().clone() for key, value in rule.state_dict().items()}
    rule.remove()
    kind, wrap, rule_args, _ = CASES[case]
    fresh = BUILD[kind](seed=5)
    fresh_rule = RULES[rule_args["rule"]](fresh, GrapeTrainingArguments(output_dir="unused", use_cpu=True,
                                                                        report_to="none", **rule_args))
    shard_like_accelerate(fresh, reshard, wrap)
    set_model_state_dict(fresh, weights, options=full)
    fresh_rule.load_state_dict(feedback)
    return fresh, fresh_rule, torch.optim.SGD(fresh.parameters(), lr=LR)


def train(case: str, rank: int = 0, processes: int = 1, reshard: bool | None = None,
          resume_after: int | None = None) -> dict[str, torch.Tensor]:
    """Train `case` for STEPS SGD steps, on this process's share of each batch (sharded unless `reshard` is None);
    with `resume_after`, the model, rule and optimizer are `reload`ed after that many steps.

    Returns the weights (`weights.<name>`, gathered) and the feedback state (`feedback.<key>`) after the last
    step, the feedback state after the first (`first_feedback.<key>`) and, with resharding, `freed_below`
    (backwards, 2): per backward, whether the last block was resharded, and whether its gradients were
    reduced, when the first block's gradients arrived."""
    kind, wrap, rule_args, accumulation = CASES[case]
    model = BUILD[kind]()
    args = GrapeTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **rule_args)
    rule = RULES[args.rule](model, args)  # before sharding, as GrapeTrainer does
    freed_below = []
    if reshard is not None:
        from torch.distributed.tensor import DTensor

        shard_like_accelerate(model, reshard, wrap)
        first, last = (model.get_submodule(name) for name in (rule.placement.cuts[0], rule.placement.cuts[-1]))

        def last_block_done(param):  # the first block's gradient is in: is the last block freed, reduced?
            last_param = next(last.parameters())  # the sharded parameter once freed
            freed_below.append((isinstance(last_param, DTensor), last_param.grad is not None))

        def watch(module, args, kwargs):  # inside its forward the block holds its gathered (plain) parameters
            gathered = next(module.parameters())
            if not isinstance(gathered, DTensor) and not hasattr(gathered, "_watched"):
                gathered._watched = gathered.register_post_accumulate_grad_hook(last_block_done)
        first.register_forward_pre_hook(watch, with_kwargs=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ranks, size = [rank] if processes > 1 else range(PROCESSES), BATCH // accumulation
    record = {}
    for step, batch in enumerate(batches(kind)):
        for micro in range(accumulation):  # a process's micro-batch m: the m-th slice of its share of the batch
            rows = [r * BATCH + micro * size + i for r in ranks for i in range(size)]
            if reshard is not None:  # as accelerate's no_sync under FSDP2
                model.set_requires_gradient_sync(micro == accumulation - 1)
            inputs = {key: value[rows] for key, value in batch.items()}
            if case in PROBED and micro == 0:  # as GrapeTrainer.compute_loss, on the (unwrapped) sharded model
                cosines = true_alignment(rule, lambda inputs=inputs: model(**inputs).loss).values()
                assert all(abs(cos) <= 1 + 1e-6 for cos in cosines)  # identity feedback: 1 up to rounding
            loss, _ = rule.training_forward(lambda batch: (model(**batch).loss, None), inputs, step, micro == 0)
            (loss / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        rule.end_step(False)
        prefix = "first_feedback" if step == 0 else "feedback"
        if step in (0, STEPS - 1):
            record.update({f"{prefix}.{key}": value.detach().cpu().clone() for key, value in rule.state_dict().items()})
        if step + 1 == resume_after:
            model, rule, optimizer = reload(case, model, rule, reshard)
    for name, param in model.named_parameters():
        record[f"weights.{name}"] = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()
        if reshard is not None and param.shape[0] >= processes:  # really split across the processes
            assert param.to_local().numel() < param.numel(), name
    if reshard:
        record["freed_below"] = torch.tensor(freed_below)
    return record


def worker(output: str) -> None:
    """One of the launched processes: every case, with and without resharding, into `<case>_<reshard>.safetensors`
    (rank 0)."""
    from accelerate import PartialState

    state = PartialState(cpu=True)  # gloo
    assert state.num_processes == PROCESSES, f"launched with {state.num_processes} processes"

    def save(record: dict[str, torch.Tensor], name: str) -> None:
        if state.is_main_process:
            save_file({k: v.contiguous() for k, v in record.items()}, os.path.join(output, f"{name}.safetensors"))

    for case in CASES:
        for reshard in (True, False):
            save(train(case, state.process_index, PROCESSES, reshard), f"{case}_{reshard}")
    for case in RESUMED:
        save(train(case, state.process_index, PROCESSES, reshard=True, resume_after=1), f"{case}_resumed")
    state.wait_for_everyone()
    state.destroy_process_group()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Run the worker in PROCESSES real processes (gloo on CPU); the folder of their records."""
    return launched_folder(tmp_path_factory, __file__, PROCESSES)



@pytest.mark.parametrize("case", list(CASES))
def test_sharded_processes_match_one_process_of_twice_the_batch(launched, case):
    single = train(case)
    initial = BUILD[CASES[case][0]]().state_dict()
    for reshard in (True, False):
        sharded = load_file(str(launched / f"{case}_{reshard}.safetensors"))
        assert sharded.keys() - {"freed_below"} == single.keys()
        for key, value in single.items():
            if value.is_floating_point():
                assert close(sharded[key], value), (reshard, key, float((sharded[key] - value).norm() / value.norm()))
            else:
                assert torch.equal(sharded[key], value), (reshard, key)
        if reshard:  # each block reduced and freed after its own backward, not at the end of the backward
            accumulation = CASES[case][3]
            freed, reduced = sharded["freed_below"].view(STEPS, accumulation, 2).unbind(-1)
            assert freed.all()
            assert reduced[:, -1].all() and not reduced[:, :-1].any()  # reduce-scattered on a step's last micro-batch
    for name, value in initial.items():  # every parameter moved: the comparison is of real updates
        if f"weights.{name}" in single:
            assert not torch.equal(value, single[f"weights.{name}"]), name
    if CASES[case][2]["rule"] == "grape":  # the matrices learned, identically
        name = next(key for key in single if key.startswith("feedback.matrices."))
        assert int(single["feedback.aligner.estimates_seen"]) == STEPS
        assert not torch.allclose(single[name], single["first_" + name])


@pytest.mark.parametrize("case", RESUMED)
def test_sharded_resume_is_bitwise(launched, case):
    """Resuming a sharded run (FSDP2's full state dict of the weights, the rule's state, into a fresh model that
    started elsewhere) continues it bit for bit: the same weights and feedback state after the last step."""
    uninterrupted = load_file(str(launched / f"{case}_True.safetensors"))
    resumed = load_file(str(launched / f"{case}_resumed.safetensors"))
    compared = [key for key in uninterrupted if key.startswith(("weights.", "feedback."))]
    assert compared and {key for key in resumed if key.startswith(("weights.", "feedback."))} == set(compared)
    differ = [key for key in compared if not torch.equal(uninterrupted[key], resumed[key])]
    assert not differ, differ


def test_fsdp_refusals_name_the_reason():
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert fsdp_refusal(FullyShardedDataParallelPlugin(fsdp_version=2), "grape") is None
    assert "version 1" in fsdp_refusal(FullyShardedDataParallelPlugin(fsdp_version=1), "dfa")
    assert "'fa'" in fsdp_refusal(FullyShardedDataParallelPlugin(fsdp_version=2), "fa")
    checkpointing = FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True)
    assert "activation checkpointing" in fsdp_refusal(checkpointing, "drtp")


if __name__ == "__main__":
    worker(sys.argv[1])
