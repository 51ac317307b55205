"""`parallel_backward`: the segments' local backwards on threads give the sequential backward's gradients.

Each case runs one training forward and backward of the same model and batch twice, with the segments'
backwards handed to the autograd engine (0 threads) and to 2 threads, and compares every parameter's
gradient bitwise. Phi's parallel attention and MLP branches share one input norm: their points must run
on one thread together, or the norm's two gradients would never be summed before its backward.
The segment threads use one intra-op thread each, and CPU reductions (a norm's weight gradient over the
batch) depend on the thread count, so the one backward they are compared with runs on one thread too.
"""

import copy

import pytest
import torch
from tiny_models import FAMILIES, image_batch, image_dataset, quick_args, tiny_gpt2, tiny_vit, token_batch, \
    token_dataset

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.direct.parallel import independent_groups
from grape_hf.rules import RULES


def phi_batch() -> dict:
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


CASES = {
    "gpt2": (lambda: tiny_gpt2(n_layer=3), token_batch),
    "vit": (tiny_vit, image_batch),
    "phi": (FAMILIES["Phi"].build, phi_batch),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_gradients(model, batch: dict, rule: str, setting: str, threads: int, **fields) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one training forward and backward of `rule` with `threads` (and any other
    GrapeTrainingArguments `fields`)."""
    args = GrapeTrainingArguments(output_dir="unused", rule=rule, setting=setting, parallel_backward=threads,
                                  report_to="none", use_cpu=True, **fields)
    installed = RULES[rule](model, args)
    try:
        loss, _ = installed.training_forward(lambda inputs: (model(**inputs).loss, None), batch, 0, True)
        loss.backward()
    finally:
        installed.remove()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("rule", ["dfa", "grape"])
@pytest.mark.parametrize("setting", ["macro", "micro"])
@pytest.mark.parametrize("case", list(CASES))
def test_threads_give_the_sequential_gradients(case, setting, rule, one_thread):
    build, batch = CASES[case]
    model = build()
    sequential = step_gradients(copy.deepcopy(model), batch(), rule, setting, threads=0)
    threaded = step_gradients(copy.deepcopy(model), batch(), rule, setting, threads=2)
    unreached = [name for name, grad in threaded.items() if grad is None]
    assert not unreached, f"no gradient with threads: {unreached}"
    differ = [name for name in sequential if not torch.equal(sequential[name], threaded[name])]
    assert not differ, f"gradients differ with threads: {differ}"


def test_identity_feedback_threads_give_the_sequential_gradients(one_thread):
    """Identity feedback hands every segment a view of the one error tensor (no matmul, no copy): the threads
    only read it."""
    model = tiny_gpt2(n_layer=3)
    sequential = step_gradients(copy.deepcopy(model), token_batch(), "dfa", "micro", 0, feedback_init="identity")
    threaded = step_gradients(copy.deepcopy(model), token_batch(), "dfa", "micro", 2, feedback_init="identity")
    assert all(torch.equal(sequential[name], threaded[name]) for name in sequential)


@pytest.mark.parametrize("setting", ["macro", "micro"])
def test_drtp_threads_give_the_sequential_gradients(setting, one_thread):
    model = tiny_vit()
    sequential = step_gradients(copy.deepcopy(model), image_batch(), "drtp", setting, threads=0)
    threaded = step_gradients(copy.deepcopy(model), image_batch(), "drtp", setting, threads=2)
    assert all(torch.equal(sequential[name], threaded[name]) for name in sequential)


def test_points_sharing_an_input_norm_are_one_group():
    """Phi micro: each block's attention and MLP branches read one norm, so they are one group; the
    embeddings' point and the blocks' are independent."""
    model = FAMILIES["Phi"].build()
    args = GrapeTrainingArguments(output_dir="unused", rule="dfa", setting="micro", report_to="none", use_cpu=True)
    rule = RULES["dfa"](model, args)
    recorded = {}
    original = rule.network._tap

    def keep(z):
        recorded.update(rule.network._recorded)
        return original(z)

    rule.network._tap = keep
    try:
        model(**phi_batch())
    finally:
        rule.remove()
    names = list(recorded)
    groups = [sorted(names[i] for i in group) for group in independent_groups([recorded[n] for n in names])]
    assert sorted(groups) == [["embeddings"], ["model.layers.0.mlp", "model.layers.0.self_attn"],
                              ["model.layers.1.mlp", "model.layers.1.self_attn"]]


@pytest.mark.parametrize("rule,setting,model,data", [
    ("dfa", "micro", lambda: tiny_gpt2(n_layer=3), token_dataset),
    ("grape", "macro", tiny_vit, image_dataset),
])
def test_trainer_with_threads_trains_as_without(rule, setting, model, data, tmp_path):
    """Three SGD steps of two micro-batches each through `GrapeTrainer`: the same weights, and the locality
    audit (whose forward keeps the sequential tap) still passes with threads on. (SGD: Adam would turn the
    rounding noise of a gradient that is zero in exact arithmetic, such as an attention key bias's, into
    full-size steps.)"""
    weights = {}
    for threads in (0, 2):
        args = quick_args(tmp_path / str(threads), rule=rule, setting=setting, max_steps=3, gradient_accumulation_steps=2,
                          per_device_train_batch_size=2, parallel_backward=threads, optim="sgd")
        trainer = GrapeTrainer(model=model(), args=args, train_dataset=data())
        trainer.train()
        weights[threads] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        assert trainer.audit_locality().ok
    for name, value in weights[0].items():
        # GPT-2's tied embedding adds the head's and the embeddings' gradients in another order under accumulation.
        torch.testing.assert_close(weights[2][name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_parallel_backward_must_be_a_count():
    with pytest.raises(ValueError, match="parallel_backward"):
        GrapeTrainingArguments(output_dir="unused", parallel_backward=-1, report_to="none")


def test_a_second_backward_through_one_forward_is_refused():
    model = tiny_gpt2()
    args = GrapeTrainingArguments(output_dir="unused", rule="dfa", parallel_backward=2, report_to="none", use_cpu=True)
    rule = RULES["dfa"](model, args)
    try:
        loss, _ = rule.training_forward(lambda inputs: (model(**inputs).loss, None), token_batch(), 0, True)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()
    finally:
        rule.remove()
