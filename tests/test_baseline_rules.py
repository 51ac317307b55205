"""The paper's baselines as rules (FA, DRTP, PEPITA): their mechanisms, their errors, and the Trainer running them.

Their formulas are checked against hand-written references in test_rule_references.py; here: FA with
`B = W` is BP exactly (Linear and Conv2d), the rules' scale follows gradient accumulation, PEPITA's two
passes share dropout masks, DRTP passes the locality audit, checkpoints resume, and misuse fails clearly.
"""

import importlib.util
import math
import os

import pytest
import torch
from tiny_models import image_batch, tiny_gpt2, tiny_vit
from torch import nn
from torch.nn.functional import one_hot
from transformers import HfArgumentParser, PretrainedConfig, PreTrainedModel

from grape_hf import GrapeTrainer, GrapeTrainingArguments, audit_locality
from grape_hf.direct.matrices import FeedbackMatrices, point_seed
from grape_hf.models import MLPConfig, MLPForImageClassification
from grape_hf.rules import RULES

COMMON = dict(report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
CLASSES = 5


def grape_args(tmp_path, **kwargs) -> GrapeTrainingArguments:
    return GrapeTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, **kwargs})


def mlp(seed: int = 0) -> MLPForImageClassification:
    torch.manual_seed(seed)
    return MLPForImageClassification(MLPConfig(num_channels=1, image_size=4, hidden_size=12, num_hidden_layers=2,
                                               num_labels=CLASSES))


def image_examples(n: int = 16, channels: int = 1, side: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(n, channels, side, side, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(n)]


def as_batch(examples: list[dict]) -> dict:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


class TinyCNNConfig(PretrainedConfig):
    model_type = "grape_test_cnn"


class TinyCNN(PreTrainedModel):
    """conv (stride 2, padding 1) -> ReLU -> grouped conv -> ReLU -> flatten -> classifier: (N, 3, 8, 8) -> (N, 5)."""

    config_class = TinyCNNConfig

    def __init__(self, config, padding=1):
        super().__init__(config)
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=padding)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, dilation=1, groups=2)
        self.classifier = nn.Linear(4 * 4 * 4, CLASSES)
        self.post_init()

    def forward(self, pixel_values, labels=None):
        hidden = self.conv2(self.conv1(pixel_values).relu()).relu()
        logits = self.classifier(hidden.flatten(1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def tiny_cnn(seed: int = 0, padding=1) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(TinyCNNConfig(), padding=padding)


def gradients(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch)["loss"].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# FA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_model, examples", [(mlp, image_examples(8)), (tiny_cnn, image_examples(8, 3, 8))],
                         ids=["mlp", "cnn"])
def test_fa_with_b_equal_to_w_is_backpropagation(tmp_path, make_model, examples):
    """FA hands the layer below `δ B` (a transposed convolution with B for Conv2d): with B = W that is BP."""
    batch = as_batch(examples)
    model = make_model()
    bp = gradients(make_model(), batch)
    network = RULES["fa"](model, grape_args(tmp_path, rule="fa"))
    random_fa = gradients(model, batch)
    for name, layer in network.layers.items():
        network.matrices.tensors[name] = layer.weight.detach().reshape(layer.weight.shape[0], -1).clone()
    mirrored = gradients(model, batch)
    network.remove()
    for name in bp:
        torch.testing.assert_close(mirrored[name], bp[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # With random B, only the output layer (true error, true local gradient) keeps BP's gradient.
    assert torch.allclose(random_fa["classifier.weight"], bp["classifier.weight"], atol=1e-7)
    first = next(iter(network.layers)) + ".weight"
    assert torch.nn.functional.cosine_similarity(random_fa[first].flatten(), bp[first].flatten(), dim=0) < 0.99


def test_fa_refuses_other_weight_layers(tmp_path):
    with pytest.raises(ValueError, match=r"FA replaces W\^T by a random B in nn.Linear and nn.Conv2d layers only.*"
                                         r"transformer.wte \(Embedding\).*ln_1 \(LayerNorm\).*c_attn \(Conv1D\).*"
                                         r"Use rule='dfa' or 'grape'"):
        GrapeTrainer(model=tiny_gpt2(), args=grape_args(tmp_path, rule="fa"))
    with pytest.raises(ValueError, match=r"FA needs numeric zero padding in 'conv1'.*padding=<int>"):
        RULES["fa"](tiny_cnn(padding="valid"), grape_args(tmp_path, rule="fa"))


# DRTP -----------------------------------------------------------------------------------------------
def test_drtp_passes_the_locality_audit(tmp_path):
    """DRTP keeps DFA's points and cuts: every segment receives only its own projected target."""
    for model, batch in ((mlp(), as_batch(image_examples(4))), (tiny_vit(), image_batch())):
        report = audit_locality(model, batch, grape_args(tmp_path, rule="drtp"))
        assert report.ok and len(report.receivers) >= 3


def test_drtp_projects_the_target_not_the_error(tmp_path):
    """Two batches with the same labels but different errors give the hidden layers' outputs the same signal."""
    model = mlp()
    network = RULES["drtp"](model, grape_args(tmp_path, rule="drtp"))
    signals = []
    for scale in (1.0, 3.0):  # scaled inputs: other logits, other errors, same targets
        batch = as_batch(image_examples(4))
        batch["pixel_values"] = batch["pixel_values"] * scale
        captured = {}
        # dL/dh2 on the hidden layer's output (the point's tensor), caught where the activation makes it.
        def catch(module, args, output, captured=captured):
            output.register_hook(lambda g: captured.setdefault("g", g))

        handle = model.layers[1].act.register_forward_hook(catch)
        model(**batch).loss.backward()
        handle.remove()
        signals.append(captured["g"])
    network.remove()
    torch.testing.assert_close(signals[0], signals[1])
    expected = one_hot(batch["labels"], CLASSES).float() / 4 @ network.matrices.tensors["layers.1"].T
    torch.testing.assert_close(signals[0], expected)


def test_drtp_refuses_error_at_the_head_input_and_missing_labels(tmp_path):
    with pytest.raises(ValueError, match=r"DRTP projects the one-hot target.*error_point='head_input'.*"
                                         r"Use error_point='logits' on a classifier"):
        RULES["drtp"](tiny_gpt2(), grape_args(tmp_path, rule="drtp"))
    model = mlp()
    RULES["drtp"](model, grape_args(tmp_path, rule="drtp"))
    batch = as_batch(image_examples(4))
    logits = model(pixel_values=batch["pixel_values"]).logits
    with pytest.raises(ValueError, match=r"DRTP projects the one-hot target, but the model was called without labels"):
        nn.functional.cross_entropy(logits, batch["labels"]).backward()


# PEPITA ---------------------------------------------------------------------------------------------
class DropoutMLP(PreTrainedModel):
    config_class = TinyCNNConfig

    def __init__(self, config):
        super().__init__(config)
        self.hidden = nn.Linear(16, 32)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(32, CLASSES)
        self.post_init()

    def forward(self, pixel_values, labels=None):
        logits = self.classifier(self.dropout(self.hidden(pixel_values.flatten(1)).relu()))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_pepita_passes_share_dropout_masks(tmp_path):
    """With a vanishing F the two passes differ only if their dropout masks do: the hidden update must vanish."""
    torch.manual_seed(0)
    model = DropoutMLP(TinyCNNConfig())
    network = RULES["pepita"](model, grape_args(tmp_path, rule="pepita", pepita_f_scale=1e-9))
    before = torch.get_rng_state()
    loss, _ = network.training_forward(lambda b: (model(**b)["loss"], None), as_batch(image_examples(8)), 0, True)
    after = torch.get_rng_state()
    loss.backward()
    assert model.hidden.weight.grad.abs().max() < 1e-8
    assert model.classifier.weight.grad.abs().max() > 1e-3
    # The random state moved on as after one forward: one dropout mask drawn, not two.
    torch.set_rng_state(before)
    model.dropout(torch.ones(8, 32))
    assert torch.equal(torch.get_rng_state(), after)
    network.remove()


@pytest.mark.parametrize("make_model", [tiny_cnn, tiny_vit], ids=["cnn", "vit"])
def test_pepita_refuses_non_mlp(tmp_path, make_model):
    with pytest.raises(ValueError, match=r"PEPITA trains multilayer perceptrons only \(it has no convolutional.*"
                                         r"(conv1 \(Conv2d\)|LayerNorm).*Use rule="):
        GrapeTrainer(model=make_model(), args=grape_args(tmp_path, rule="pepita"))


def test_pepita_needs_class_labels(tmp_path):
    model = mlp()
    network = RULES["pepita"](model, grape_args(tmp_path, rule="pepita"))
    with pytest.raises(ValueError, match=r"PEPITA's error .* needs class labels of shape \(N,\).*got None"):
        network.training_forward(lambda b: (model(**b).loss, None), {"pixel_values": torch.randn(2, 1, 4, 4)}, 0, True)


def normalized(factors: list, std: float) -> list:
    """Scale the factors alike so their product has standard deviation `std`."""
    ratio = (std / torch.linalg.multi_dot(factors).std()) ** (1 / len(factors))
    return [f * ratio for f in factors]


def test_pepita_weight_mirroring_step_and_alignment(tmp_path):
    """One mirroring step is B_l + lr (x^T x W_l^T / N - wd B_l), renormalised; repeated, B_l turns to W_l^T."""
    model = mlp()
    args = grape_args(tmp_path, rule="pepita", pepita_mirror_lr=0.5, pepita_mirror_weight_decay=0.1,
                      pepita_mirror_noise=1.0)
    network = RULES["pepita"](model, args)
    assert network.point_names == ("mirror.layers.0.linear", "mirror.layers.1.linear", "mirror.classifier")
    batch = as_batch(image_examples(8))
    std = args.pepita_f_scale * math.sqrt(2 / 16)

    seeded = FeedbackMatrices(network.args.feedback_init, args.feedback_seed)  # as resolved for the model
    layers = [model.layers[0].linear, model.layers[1].linear, model.classifier]
    factors = normalized([seeded.get(name, l.in_features, l.out_features, torch.device("cpu"))
                          for name, l in zip(network.point_names, layers)], std)
    noise = torch.Generator().manual_seed(point_seed(args.feedback_seed, "mirror noise"))
    stepped = []
    for factor, layer in zip(factors, layers):
        x = torch.randn(8, layer.in_features, generator=noise)
        x = x - x.mean()
        stepped.append(factor + 0.5 * (x.T @ (x @ layer.weight.detach().T) / 8 - 0.1 * factor))
    expected = normalized(stepped, std)

    network.training_forward(lambda b: (model(**b).loss, None), batch, 0, True)
    for name, factor in zip(network.point_names, expected):
        torch.testing.assert_close(network.matrices.tensors[name], factor, msg=lambda m: f"{name}: {m}")
    assert torch.linalg.multi_dot(expected).std().item() == pytest.approx(std, rel=1e-4)

    def alignments(matrices: list) -> list[float]:
        return [float(torch.nn.functional.cosine_similarity(matrix.flatten(), layer.weight.detach().T.flatten(), dim=0))
                for matrix, layer in zip(matrices, layers)]

    assert max(abs(c) for c in alignments(factors)) < 0.5  # random at first
    for _ in range(30):
        network.training_forward(lambda b: (model(**b).loss, None), batch, 0, True)
    assert min(alignments([network.matrices.tensors[name] for name in network.point_names])) > 0.7
    network.remove()


# Both -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["fa", "pepita"])
def test_audit_and_probe_say_they_do_not_apply(tmp_path, rule):
    with pytest.raises(ValueError, match=rf"rule='{rule}' has no alignment probe.*alignment_probe_steps=0"):
        GrapeTrainer(model=mlp(), args=grape_args(tmp_path, rule=rule, alignment_probe_steps=1))
    with pytest.raises(ValueError, match=rf"rule='{rule}' has no feedback points to audit.*applies to 'dfa'"):
        audit_locality(mlp(), as_batch(image_examples(4)), grape_args(tmp_path, rule=rule))
    with pytest.raises(ValueError, match=r"pepita_f_scale=0.0 must be > 0"):
        grape_args(tmp_path, rule=rule, pepita_f_scale=0.0)


def test_cli_takes_the_baselines(tmp_path):
    (args,) = HfArgumentParser(GrapeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--rule", "pepita", "--pepita_f_scale", "0.1", "--report_to", "none"])
    assert args.rule == "pepita" and args.pepita_f_scale == 0.1
    with pytest.raises(SystemExit):
        HfArgumentParser(GrapeTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--rule", "pepita2"])


@pytest.mark.parametrize("rule", ["fa", "drtp", "pepita"])
def test_gradient_accumulation_gives_the_same_step(tmp_path, rule):
    """One step on 8 examples equals 2 accumulated micro-batches of 4: the rules' signals follow the loss's scale."""
    examples = image_examples(8)
    models = []
    for name, batch_size, accumulation in (("one", 8, 1), ("two", 4, 2)):
        model = mlp()
        args = grape_args(tmp_path / name, rule=rule, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, max_steps=1,
                          per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
        GrapeTrainer(model=model, args=args, train_dataset=examples).train()
        models.append(model)
    moved = False
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{rule} {name}: {m}")
        moved |= not torch.equal(a, mlp().get_parameter(name))
    assert moved


@pytest.mark.parametrize("rule, options", [("fa", {}), ("drtp", {}), ("pepita", {}),
                                           ("pepita", {"pepita_mirror_lr": 0.01})], ids=["fa", "drtp", "pepita",
                                                                                         "pepita-mirror"])
def test_trainer_runs_and_resumes_each_baseline(tmp_path, rule, options):
    """Three steps train every layer; resumed from the checkpoint at step 2, the third step gives the same
    matrices (mirrored ones included: the noise generator resumes too)."""
    model = mlp()
    args = grape_args(tmp_path, rule=rule, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                      logging_steps=1, save_strategy="steps", save_steps=2, **options)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = GrapeTrainer(model=model, args=args, train_dataset=image_examples(12))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{rule} did not train {name}"

    resumed = GrapeTrainer(model=mlp(), args=args, train_dataset=image_examples(12))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert set(resumed.feedback.matrices.tensors) == set(trainer.feedback.matrices.tensors)
    for name, matrix in trainer.feedback.matrices.tensors.items():
        torch.testing.assert_close(resumed.feedback.matrices.tensors[name], matrix)


# Table 1 in each baseline's own setting ---------------------------------------------------------------
def load_script(*path: str):
    """A benchmark or example script of the repository, imported as a module."""
    file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(path[-1])[0], file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table1_own_settings_are_the_example_flags_they_claim(tmp_path):
    """Every cell run in its own paper's setting parses with the example's own flags into that setting, and
    PEPITA's milestone decay (x0.1 after epochs 60 and 90) is the optimizer's real schedule."""
    table1, example = load_script("benchmarks", "reproduce_table1.py"), load_script("examples",
                                                                                   "run_image_classification.py")
    parsed = {}
    for (row, rule), (_, flags) in table1.OWN_SETTINGS.items():
        model_args, _, args = example.parse_args(["--output_dir", str(tmp_path), "--rule", rule, *flags])
        parsed[row, rule] = (model_args.overrides, args)
    overrides, pepita = parsed["mnist_mlp", "pepita"]
    assert overrides == {"num_hidden_layers": 1} and pepita.optim == "sgd" and pepita.optim_args == "momentum=0.9"
    assert (pepita.learning_rate, pepita.weight_decay, pepita.per_device_train_batch_size) == (0.01, 1e-4, 64)
    assert (pepita.lr_decay_per_epoch, pepita.lr_decay_epochs, pepita.pepita_f_scale) == (0.1, [60, 90], 0.05)
    overrides, drtp = parsed["mnist_mlp", "drtp"]
    assert overrides == {"hidden_act": "tanh"} and drtp.optim_args == "momentum=0.9,nesterov=True"
    assert (drtp.per_device_train_batch_size, drtp.lr_decay_per_epoch, drtp.lr_decay_epochs) == (100, 1, None)
    # A shared-setting cell stays in the shared setting although the example would apply the published regime.
    for rule in ("drtp", "pepita"):
        model_args, _, shared = example.parse_args(["--output_dir", str(tmp_path), "--rule", rule,
                                                    *table1.shared_flags("mnist_mlp", rule)])
        assert (shared.optim, shared.learning_rate, shared.weight_decay, model_args.overrides) == (
            "adamw_torch", 1e-4, 0.0, {})
    assert table1.shared_flags("mnist_mlp", "dfa") == ()

    # 16 examples in batches of 4: 4 steps per epoch, so the decays fall after steps 4 and 8.
    args = example.parse_args(["--output_dir", str(tmp_path), "--rule", "pepita", "--use_cpu", "--optim", "sgd",
                               "--learning_rate", "0.01", "--per_device_train_batch_size", "4", "--lr_decay_per_epoch",
                               "0.1", "--lr_decay_epochs", "1", "2", "--report_to", "none", "--eval_strategy",
                               "no", "--save_strategy", "no"])[2]
    trainer = example.ImageClassificationTrainer(model=mlp(), args=args, train_dataset=image_examples(16))
    trainer.create_optimizer_and_scheduler(num_training_steps=12)
    rates = []
    for _ in range(12):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates == pytest.approx([0.01] * 4 + [0.001] * 4 + [0.0001] * 4)
    with pytest.raises(ValueError, match="lr_decay_epochs=\\[0\\] must be epoch numbers >= 1"):
        example.parse_args(["--output_dir", str(tmp_path), "--lr_decay_epochs", "0"])
