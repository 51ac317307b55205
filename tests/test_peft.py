"""PEFT adapters under the direct rules: a tiny GPT-2 pretrained by BP inside the tests (saved with
`save_pretrained`, loaded back with `from_pretrained`), fine-tuned through LoRA under dfa and grape. Only the
adapters move, the frozen base's points are cuts with no matrix and no estimate, the audit and the first step's
reach check hold, the adapter round-trips through PEFT without grape_hf, resume is bitwise; and every PEFT method
trains under every direct rule and setting or is refused with its reason."""

import json
import os
import subprocess
import sys

import datasets
import pytest
import torch
from safetensors import safe_open
from tiny_models import VOCAB, quick_args, tiny_gpt2, tiny_llama, token_dataset
from transformers import AutoModelForCausalLM, GPT2Config, GPT2ForSequenceClassification, Trainer, TrainingArguments

from grape_hf import GrapeTrainer
from grape_hf.checkpoint import FEEDBACK_FILE
from grape_hf.diagnostics.audit import LocalityError, UnreachedParametersError, audit_network
from grape_hf.direct.network import TAP
from grape_hf.direct.placement import EMBEDDINGS, Placement
from grape_hf.rules import RULES

peft = pytest.importorskip("peft")  # the `peft` extra: `pip install -e ".[dev,peft]"`

from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402

LENGTH = 32
BLOCKS = ("base_model.model.transformer.h.0", "base_model.model.transformer.h.1")
# Every feedback field given, so that these tests do not move with the library's defaults.
FEEDBACK = dict(feedback_init="identity", error_point="residual", feedback_seed=0, feedback_embeddings=True,
                block_lr_scale=1.0, bp_calibration_steps=0, alignment_probe_steps=0, parallel_backward=0,
                grape_lr=1e-3, grape_alignment="frobenius", grape_smoothing="none", grape_track_scale=False,
                grape_update_steps=1)


def markov_stream(rows: int, multiplier: int, offset: int, seed: int) -> torch.Tensor:
    """(rows, LENGTH) token ids of a fixed chain: the next token is (multiplier * t + offset) % VOCAB, one time in
    eight a random one. Two (multiplier, offset) pairs are two domains."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(rows, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (rows,), generator=g)
    for t in range(1, LENGTH):
        noise = torch.randint(0, VOCAB, (rows,), generator=g)
        follow = (multiplier * ids[:, t - 1] + offset) % VOCAB
        ids[:, t] = torch.where(torch.rand(rows, generator=g) < 0.125, noise, follow)
    return ids


def as_dataset(ids: torch.Tensor) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


PRETRAIN = (3, 1)  # the pretraining domain
FINETUNE = (5, 2)  # the fine-tuning domain


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
    """The folder of a tiny GPT-2 pretrained by BP (the stock Trainer) on the pretraining domain."""
    folder = tmp_path_factory.mktemp("pretrained")
    model = tiny_gpt2()
    args = TrainingArguments(output_dir=str(folder / "run"), max_steps=150, per_device_train_batch_size=16,
                             learning_rate=1e-2, warmup_steps=10, use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, seed=0)
    Trainer(model, args=args, train_dataset=as_dataset(markov_stream(256, *PRETRAIN, seed=0))).train()
    model.save_pretrained(folder / "model")
    return str(folder / "model")


def lora() -> LoraConfig:
    """LoRA on GPT-2's Conv1D layers (their weight is (in, out): fan_in_fan_out)."""
    return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                      task_type=TaskType.CAUSAL_LM)


def eval_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def split(model) -> tuple[dict, dict]:
    """(frozen, trainable) parameters of `model` by name, cloned."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, trainable


def assert_only_adapters_moved(model, frozen: dict, trainable: dict) -> None:
    now = dict(model.named_parameters())
    assert [n for n, p in frozen.items() if not torch.equal(now[n], p)] == []  # the base, bitwise
    assert [n for n, p in trainable.items() if torch.equal(now[n], p)] == []  # every adapter tensor


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_lora_fine_tuning_moves_only_the_adapters_and_lowers_the_eval_loss(tmp_path, pretrained, rule):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(pretrained), lora())
    held_out = markov_stream(32, *FINETUNE, seed=2)
    before = eval_loss(model, held_out)  # LoRA's B starts at zero: the pretrained model itself
    frozen, trainable = split(model)
    args = quick_args(tmp_path, rule=rule, setting="macro", max_steps=40, per_device_train_batch_size=16,
                      learning_rate=1e-2, logging_steps=10, **FEEDBACK)
    trainer = GrapeTrainer(model, args=args, train_dataset=as_dataset(markov_stream(320, *FINETUNE, seed=1)))
    # The frozen embeddings' point is a cut: no matrix, no estimate (GrAPE crashed on it with a KeyError).
    assert trainer.feedback.point_names == BLOCKS and trainer.feedback.placement.frozen == (EMBEDDINGS,)
    trainer.train()
    assert set(trainer.feedback.matrices.tensors) == set(BLOCKS)
    assert rule != "grape" or set(trainer.feedback.targets) == set(BLOCKS)
    assert_only_adapters_moved(model, frozen, trainable)
    after = eval_loss(model, held_out)
    assert after < before - 0.1, (before, after)
    report = trainer.audit_locality({"input_ids": held_out[:4], "labels": held_out[:4]})
    assert report.ok and list(report.receivers) == [*BLOCKS, TAP]
    # Each block's adapters receive their own point's feedback only; the frozen base receives nothing.
    for block in BLOCKS:
        assert report.receivers[block] and all(name.startswith(block + ".") and "lora_" in name
                                                for name in report.receivers[block])


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_checkpoints_resume_bitwise_and_the_adapter_reloads_without_grape_hf(tmp_path, pretrained, rule):
    data = as_dataset(markov_stream(64, *FINETUNE, seed=1))

    def run(folder, resume=None):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(pretrained), lora())
        args = quick_args(tmp_path, output_dir=str(tmp_path / folder), rule=rule, setting="micro", max_steps=4,
                          save_strategy="steps", save_steps=2, **FEEDBACK)
        trainer = GrapeTrainer(model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run("whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json", FEEDBACK_FILE} <= set(os.listdir(checkpoint))
    resumed = run("resumed", resume=str(checkpoint))
    adapters = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    now = dict(resumed.model.named_parameters())
    assert adapters and all(torch.equal(p, now[n]) for n, p in adapters.items())
    state, again = whole.feedback.state_dict(), resumed.feedback.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)

    # The points, with PEFT's prefixes, are the same in the checkpoint's header, the audit and the model card.
    points = whole.feedback.point_names
    assert all(point.startswith("base_model.model.transformer.h.") for point in points) and len(points) == 4
    with safe_open(str(checkpoint / FEEDBACK_FILE), "pt") as file:
        assert json.loads(file.metadata()["points"]) == list(points)
    assert list(whole.audit_locality().receivers) == [*points, TAP]
    out = tmp_path / "adapter"
    whole.save_model(str(out))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out))
    assert "model.safetensors" not in os.listdir(out)  # the adapter only, as PEFT users expect
    card = (out / "README.md").read_text()
    assert "A PEFT LoRA adapter" in card and f"base model `{pretrained}`" in card and f"| rule | `{rule}` |" in card
    assert all(f"`{point}`" in card for point in points) and "PeftModel.from_pretrained(base" in card
    assert "library_name: peft" in card

    if rule != "grape":
        return  # one fresh process is enough
    batch = markov_stream(2, *FINETUNE, seed=3)
    with torch.no_grad():
        expected = whole.model(input_ids=batch).logits
    code = ("import sys, torch; from peft import PeftModel; from transformers import AutoModelForCausalLM\n"
            f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({pretrained!r}), {str(out)!r})\n"
            f"torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits.detach(), "
            f"{str(tmp_path / 'logits.pt')!r})\n"
            "assert not any(name.startswith('grape_hf') for name in sys.modules)\n")
    torch.save(batch, tmp_path / "ids.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)


# Every PEFT method under every direct rule and setting: trains (only the adapters move, the audit holds) or is
# refused at install with its reason. dfa and grape on a causal LM; drtp, which projects class labels, on a
# sequence classifier. 2 steps: LoRA's A moves only once B has left zero.
METHODS = {
    "lora": lambda task: LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type=task),
    "dora": lambda task: LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True,
                                    task_type=task),
    "ia3": lambda task: IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                  fan_in_fan_out=True, task_type=task),
    "prompt_tuning": lambda task: PromptTuningConfig(num_virtual_tokens=4, task_type=task),
}


def classifier() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, num_labels=3, pad_token_id=0))


def class_dataset(n: int = 8) -> datasets.Dataset:
    g = torch.Generator().manual_seed(1)
    return datasets.Dataset.from_dict({"input_ids": torch.randint(1, VOCAB, (n, 12), generator=g).tolist(),
                                       "labels": torch.randint(0, 3, (n,), generator=g).tolist()}).with_format("torch")


@pytest.mark.parametrize("setting", ["macro", "micro"])
@pytest.mark.parametrize("rule", ["dfa", "grape", "drtp"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_peft_method_trains_or_is_refused(tmp_path, method, rule, setting):
    if rule == "drtp":
        model = get_peft_model(classifier(), METHODS[method](TaskType.SEQ_CLS))
        data, feedback = class_dataset(), {**FEEDBACK, "feedback_init": "normal", "error_point": "logits"}
    else:
        model = get_peft_model(tiny_gpt2(), METHODS[method](TaskType.CAUSAL_LM))
        data, feedback = token_dataset(n=8), FEEDBACK
    args = quick_args(tmp_path, rule=rule, setting=setting, **feedback)
    if method == "prompt_tuning":
        with pytest.raises(ValueError, match=r"cannot train the PEFT prompt-learning adapter PROMPT_TUNING: .*virtual "
                                             r"tokens.* Use an adapter inside the blocks \(LoRA, DoRA, IA3"):
            GrapeTrainer(model, args=args, train_dataset=data)
        return
    frozen, trainable = split(model)
    trainer = GrapeTrainer(model, args=args, train_dataset=data)
    assert EMBEDDINGS in trainer.feedback.placement.frozen and EMBEDDINGS not in trainer.feedback.point_names
    trainer.train()
    assert_only_adapters_moved(model, frozen, trainable)
    assert set(trainer.feedback.matrices.tensors) == set(trainer.feedback.point_names)
    assert trainer.audit_locality().ok


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_llama_lora_on_attention_only_cuts_the_frozen_mlp_points(tmp_path, rule):
    """LoRA on Llama's Linear q_proj and v_proj: in the micro setting the MLP branches hold no trainable parameter,
    so their points are cuts with no matrix; the attention points train."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen, trainable = split(model)
    trainer = GrapeTrainer(model, args=quick_args(tmp_path, rule=rule, setting="micro", **FEEDBACK),
                           train_dataset=token_dataset(n=8))
    layers = "base_model.model.model.layers"
    assert trainer.feedback.point_names == (f"{layers}.0.self_attn", f"{layers}.1.self_attn")
    assert trainer.feedback.placement.frozen == (EMBEDDINGS, f"{layers}.0.mlp", f"{layers}.1.mlp")
    trainer.train()
    assert_only_adapters_moved(model, frozen, trainable)
    assert set(trainer.feedback.matrices.tensors) == set(trainer.feedback.point_names)
    assert trainer.audit_locality().ok


def test_a_block_without_adapters_is_a_cut(tmp_path):
    """LoRA on the second block only: the first block's point is a cut, with no matrix, no estimate and no feedback;
    the GrAPE estimate of the second block still sees the whole network."""
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, layers_to_transform=[1],
                        layers_pattern="h")
    model = get_peft_model(tiny_gpt2(), config)
    frozen, trainable = split(model)
    trainer = GrapeTrainer(model, args=quick_args(tmp_path, rule="grape", setting="macro", **FEEDBACK),
                           train_dataset=token_dataset(n=8))
    assert trainer.feedback.point_names == BLOCKS[1:] and trainer.feedback.placement.frozen == (EMBEDDINGS, BLOCKS[0])
    trainer.train()
    assert_only_adapters_moved(model, frozen, trainable)
    assert set(trainer.feedback.matrices.tensors) == set(trainer.feedback.targets) == {BLOCKS[1]}
    report = trainer.audit_locality()
    assert report.ok and report.frozen == [EMBEDDINGS, BLOCKS[0]] and list(report.receivers) == [BLOCKS[1], TAP]


def test_an_adapter_no_point_reaches_is_reported(tmp_path):
    """Points on the second block only: the first block's adapters get no gradient, and the first step says so
    (the frozen base is not reported)."""
    model = get_peft_model(tiny_gpt2(), METHODS["lora"](TaskType.CAUSAL_LM))
    args = quick_args(tmp_path, rule="dfa", feedback_modules=[BLOCKS[1]], **FEEDBACK)
    trainer = GrapeTrainer(model, args=args, train_dataset=token_dataset(n=8))
    with pytest.raises(UnreachedParametersError, match=r"gave 4 trainable parameters no gradient in the first "
                                                       rf"training step: {BLOCKS[0]}\.attn\.c_attn\.lora_A.*cut "
                                                       r"for their frozen segments: \['embeddings'\]"):
        trainer.train()


def test_a_real_leak_past_the_frozen_base_is_reported(tmp_path):
    """A placement given by hand without cuts, points on the first block's MLP and on the second block: the first
    block's attention output is no point, so both points' feedback reaches its adapter. The audit names it (B: A
    gets no gradient while B is zero)."""
    model = get_peft_model(tiny_gpt2(), METHODS["lora"](TaskType.CAUSAL_LM))
    points = (f"{BLOCKS[0]}.mlp", BLOCKS[1])
    placement = Placement(points=points, embedding_block=None, cuts=(), head="base_model.model.transformer.ln_f",
                          error_point="head_input")
    rule = RULES["dfa"](model, quick_args(tmp_path, rule="dfa", **FEEDBACK), placement=placement)
    with pytest.raises(LocalityError, match=rf"LEAK {BLOCKS[0]}\.attn\.c_attn\.lora_B\.default\.weight receives "
                                            rf"gradient from {points[0]}, {points[1]}"):
        audit_network(model, rule, {"input_ids": token_dataset(n=2)[:]["input_ids"]})


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_a_point_placed_by_hand_on_a_frozen_segment_raises(tmp_path, rule):
    """The frozen embeddings given a point by hand: DFA skipped it without a word and GrAPE estimated it and
    crashed (KeyError: 'embeddings'); now the forward names it."""
    model = get_peft_model(tiny_gpt2(), METHODS["lora"](TaskType.CAUSAL_LM))
    placement = Placement(points=BLOCKS, embedding_block=BLOCKS[0], cuts=BLOCKS,
                          head="base_model.model.transformer.ln_f", error_point="head_input")
    rule_ = RULES[rule](model, quick_args(tmp_path, rule=rule, **FEEDBACK), placement=placement)
    batch = token_dataset(n=2)[:]
    with pytest.raises(RuntimeError, match="Feedback point 'embeddings' carries no gradient"):
        rule_.training_forward(lambda inputs: (model(**inputs).loss, None), batch, 0, True)


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_trl_peft_config_path(tmp_path, rule):
    """TRL's `peft_config=`: SFTTrainer wraps the model before the rule is installed on it."""
    pytest.importorskip("trl")
    from test_sft import COMMON, text_dataset, tiny_model, word_tokenizer

    from grape_hf.sft import GrapeSFTConfig, GrapeSFTTrainer

    model = tiny_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}  # LoRA wraps these modules in place
    args = GrapeSFTConfig(output_dir=str(tmp_path), rule=rule, **{**COMMON, **FEEDBACK})
    trainer = GrapeSFTTrainer(model, args=args, train_dataset=text_dataset(), processing_class=word_tokenizer(),
                              peft_config=METHODS["lora"](TaskType.CAUSAL_LM))
    assert isinstance(trainer.model, PeftModel) and trainer.feedback.point_names == BLOCKS
    trainer.train()
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
              for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen.keys() == base.keys() and all(torch.equal(p, base[n]) for n, p in frozen.items())
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(p.any() for p in lora_b)  # every B left zero: the adapters trained
    assert trainer.audit_locality().ok
