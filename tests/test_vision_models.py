"""grape_hf.models: DFA's convolutional gradients by hand, save/reload through the Auto classes, the
locality audit for every model and setting, batch norm under the rules, and clear errors."""

import dataclasses

import pytest
import torch
from datasets import Dataset
from tiny_models import FAMILIES
from torch.nn.functional import conv2d, cross_entropy, max_pool2d, max_unpool2d, relu
from torch.nn.grad import conv2d_weight
from transformers import AutoConfig, AutoModelForImageClassification

from grape_hf import (
    MODEL_NAMES,
    GrapeTrainer,
    GrapeTrainingArguments,
    LocalityError,
    audit_locality,
    build_image_model,
    resolve_placement,
)
from grape_hf.diagnostics.audit import audit_network
from grape_hf.direct.network import TAP
from grape_hf.rules import DFA, RULES

LABELS = 10
# Narrow versions of each model: the audit and gradient tests are about mechanics, not capacity.
TINY = {
    "mlp": dict(hidden_size=16),
    "cnn": dict(conv_channels=[[3], [4]], hidden_sizes=[8]),
    "alexnet": dict(conv_channels=[[3], [4], [4, 4, 4]], hidden_sizes=[8, 8]),
    "vgg16": dict(conv_channels=[[3, 3], [4, 4], [4, 4, 4], [4, 4, 4], [4, 4, 4]], hidden_sizes=[8, 8]),
    "vgg16_bn": dict(conv_channels=[[3, 3], [4, 4], [4, 4, 4], [4, 4, 4], [4, 4, 4]], hidden_sizes=[8, 8]),
    "resnet20": dict(widths=[2, 4, 4]),
    "resnet56": dict(widths=[2, 4, 4]),
    "vit": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16),
}


def images(n: int = 4, size: int = 32, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g),
            "labels": torch.randint(0, LABELS, (n,), generator=g)}


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_image_model(name, LABELS, 3, 32, **TINY[name])


def args(tmp_path, **kwargs) -> GrapeTrainingArguments:
    return GrapeTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


# 1. DFA on the CNN: each conv weight's gradient is conv2d_weight(layer input, B_k e through its ReLU and pooling).
def test_cnn_dfa_gradients_are_conv2d_weight_of_the_feedback(tmp_path):
    model = build_image_model("cnn", LABELS, 3, 16, conv_channels=[[3], [4]], hidden_sizes=[8])
    batch = images(size=16)
    network = RULES["dfa"](model, args(tmp_path, rule="dfa", setting="micro"))
    assert network.point_names == ("stages.0.units.0", "stages.1.units.0", "layers.0")
    model(**batch).loss.backward()

    # The same network written out by hand (conv 5x5, no padding, ReLU, 2x2 max pool).
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, feedback_inputs = batch["pixel_values"], {}
    for k in range(2):
        pre = conv2d(x, params[f"stages.{k}.units.0.conv.weight"], params[f"stages.{k}.units.0.conv.bias"])
        out, where = max_pool2d(relu(pre), 2, return_indices=True)
        feedback_inputs[f"stages.{k}.units.0"] = (x, pre, where)
        x = out
    flat = x.flatten(1)
    pre_dense = flat @ params["layers.0.linear.weight"].T + params["layers.0.linear.bias"]
    hidden = relu(pre_dense)
    logits = (hidden @ params["classifier.weight"].T + params["classifier.bias"]).requires_grad_()
    (error,) = torch.autograd.grad(cross_entropy(logits, batch["labels"]), logits)  # e = (softmax - onehot) / N

    def feedback(point, shape):
        return (error @ network.matrices.tensors[point].T).reshape(shape)  # B_k e, reshaped to C x H x W

    for point, (x_in, pre, where) in feedback_inputs.items():
        pooled_shape = (*pre.shape[:2], pre.shape[2] // 2, pre.shape[3] // 2)
        # Through the pooling (to the max of each window) and the ReLU (where it was active).
        through = max_unpool2d(feedback(point, pooled_shape), where, 2, output_size=pre.shape[2:]) * (pre > 0)
        weight = model.get_parameter(f"{point}.conv.weight")
        torch.testing.assert_close(weight.grad, conv2d_weight(x_in, weight.shape, through), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.get_parameter(f"{point}.conv.bias").grad, through.sum((0, 2, 3)))
    through = feedback("layers.0", pre_dense.shape) * (pre_dense > 0)
    torch.testing.assert_close(model.layers[0].linear.weight.grad, through.T @ flat, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.classifier.weight.grad, error.T @ hidden, rtol=1e-4, atol=1e-6)


# 2. Save and reload through the Auto classes, real sizes.
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_and_reload_through_auto_classes(name, tmp_path):
    torch.manual_seed(0)
    model = build_image_model(name, LABELS, 3, 32)
    batch = images(n=2)
    model.train()
    model(**batch)  # moves batch-norm running statistics away from their initial values: they must be saved too
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert type(AutoConfig.from_pretrained(tmp_path)) is type(model.config)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


# 3. The locality audit, every model, setting and rule.
def weight_layers(model) -> int:
    return sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())


@pytest.mark.parametrize("setting", ["micro", "macro"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_audit_passes_for_every_model(name, setting, tmp_path):
    model = tiny(name)
    report = audit_locality(model, images(), args(tmp_path, rule="dfa", setting=setting))
    assert report.ok and not report.unreached
    segments = [set(params) for source, params in report.receivers.items() if source != TAP]
    assert all(segments) and sum(map(len, segments)) == len(set().union(*segments))
    if name != "vit" and setting == "micro":
        # Micro is the paper's DFA: one point per hidden weight layer (every layer but the classifier).
        assert len(segments) == weight_layers(model) - 1


@pytest.mark.parametrize("name", ["cnn", "vgg16_bn", "resnet20"])
def test_audit_passes_under_grape(name, tmp_path):
    """GrAPE audits its own forward: dual tensors with perturbed tangents at every point."""
    assert audit_locality(tiny(name), images(), args(tmp_path, rule="grape", setting="micro")).ok


def test_declared_points(tmp_path):
    vgg = tiny("vgg16_bn")
    micro = resolve_placement(vgg, args(tmp_path, setting="micro"))
    macro = resolve_placement(vgg, args(tmp_path, setting="macro"))
    assert len(micro.points) == 13 + 2 and micro.embedding_block is None
    assert macro.points == ("stages.0", "stages.1", "stages.2", "stages.3", "stages.4", "layers.0", "layers.1")
    # The CNN's stages hold one conv each: macro points at the same tensors as micro (a stage's output is its unit's).
    assert resolve_placement(tiny("cnn"), args(tmp_path, setting="macro")).points == ("stages.0", "stages.1",
                                                                                      "layers.0")
    resnet = resolve_placement(tiny("resnet20"), args(tmp_path, setting="macro"))
    assert resnet.points == ("stem", *(f"blocks.{i}" for i in range(9))) and len(resnet.cuts) == 9
    # A declared pattern may match nothing: a CNN without dense layers has its conv points only.
    no_dense = build_image_model("cnn", LABELS, 3, 32, hidden_sizes=[])
    assert resolve_placement(no_dense, args(tmp_path, setting="micro")).points == ("stages.0.units.0",
                                                                                   "stages.1.units.0")
    # feedback_modules still overrides the declaration.
    assert resolve_placement(vgg, args(tmp_path, feedback_modules=["layers.*"])).points == ("layers.0", "layers.1")


def test_resnet_cuts_keep_chosen_points_local(tmp_path):
    """With points on the first conv of each block only, the block-input cuts keep the residual stream
    (shortcuts and second convs) from carrying true gradient between blocks; without them it leaks."""
    model = tiny("resnet20")
    chosen = args(tmp_path, setting="micro", feedback_modules=["stem", "blocks.*.unit1"])
    report = audit_locality(model, images(), chosen)
    assert report.ok and "blocks.0.conv2.weight" in report.unreached  # cut off: nothing reaches it
    broken = dataclasses.replace(resolve_placement(model, chosen), cuts=())
    network = DFA(model, chosen, placement=broken)
    try:
        with pytest.raises(LocalityError, match=r"LEAK blocks\.0\.conv2\.weight receives gradient from "
                                                r"blocks\.1\.unit1, blocks\.2\.unit1"):
            audit_network(model, network, images())
    finally:
        network.remove()


# 4. Batch norm trains and keeps its running statistics under both rules.
@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_batch_norm_model_trains_under_the_rules(rule, tmp_path):
    model = tiny("resnet20")
    data = images(n=16)
    dataset = Dataset.from_dict({k: v.tolist() for k, v in data.items()}).with_format("torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GrapeTrainer(model=model, train_dataset=dataset, args=args(
        tmp_path, rule=rule, setting="micro", max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
        save_strategy="no", disable_tqdm=True, logging_steps=1))
    trainer.train()
    after = model.state_dict()
    assert not torch.equal(before["stem.norm.running_mean"], after["stem.norm.running_mean"])
    assert after["blocks.8.norm2.num_batches_tracked"] == 2
    assert not torch.equal(before["blocks.0.unit1.conv.weight"], after["blocks.0.unit1.conv.weight"])


# 5. Bad input says what is wrong and how to fix it.
def test_clear_errors():
    with pytest.raises(ValueError, match=r"expects pixel_values of shape \(N, 3, 32, 32\).*got \(2, 3, 28, 28\)"):
        tiny("cnn")(pixel_values=torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="image_size=16 is too small for VGGConfig"):
        build_image_model("vgg16", LABELS, 3, 16)
    with pytest.raises(ValueError, match="depth=21 is not a CIFAR ResNet depth"):
        build_image_model("resnet20", LABELS, 3, 32, depth=21)
    with pytest.raises(ValueError, match="Unknown image model 'lenet'; choose one of mlp, cnn"):
        build_image_model("lenet", LABELS, 3, 32)
    with pytest.raises(ValueError, match="MLPConfig has no field hiden_size; its fields are .*hidden_size"):
        build_image_model("mlp", LABELS, 3, 32, hiden_size=64)


# 6. Hugging Face vision families: blocks that nest or that `_no_split_modules` does not name.
def hf_images() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.randint(0, 5, (2,), generator=g)}


def test_hf_resnet_blocks_are_its_stages_and_points_its_layers(tmp_path):
    """HF ResNet declares only its conv layers (inside nn.Sequential): the stages holding them are the blocks
    (the cuts), their residual layers the points, in both settings."""
    model = FAMILIES["HF ResNet"].build()
    for setting in ("macro", "micro"):
        placement = resolve_placement(model, args(tmp_path, setting=setting))
        assert placement.cuts == ("resnet.encoder.stages.0", "resnet.encoder.stages.1")
        assert placement.points == ("resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0")
        assert audit_locality(model, hf_images(), args(tmp_path, rule="dfa", setting=setting)).ok


def test_micro_points_at_the_units_of_nested_blocks(tmp_path):
    """ConvNeXt's downsampling runs before its stage's layers: it trains with the first layer. Swin's patch
    merging runs after its stage's blocks: the stage is a point of its own, whose segment is the merging."""
    convnext = audit_locality(FAMILIES["ConvNeXt"].build(), hf_images(), args(tmp_path, rule="dfa", setting="micro"))
    first = convnext.receivers["convnext.encoder.stages.1.layers.0"]
    assert "convnext.encoder.stages.1.downsampling_layer.1.weight" in first
    swin_model = FAMILIES["Swin"].build()
    # Swin declares only its stages: its blocks are found inside them, the points of both settings.
    assert resolve_placement(swin_model, args(tmp_path, setting="macro")).points == \
        resolve_placement(swin_model, args(tmp_path, setting="micro")).points
    swin = audit_locality(swin_model, hf_images(), args(tmp_path, rule="dfa", setting="micro"))
    merging = {name for name, _ in swin_model.swin.encoder.layers[0].downsample.named_parameters()}
    assert set(swin.receivers["swin.encoder.layers.0"]) == {f"swin.encoder.layers.0.downsample.{n}" for n in merging}
    assert "swin.encoder.layers.1" not in swin.receivers  # the last stage holds nothing after its blocks
    assert len([s for s in swin.receivers if ".blocks." in s]) == 4


def test_parameters_the_forward_never_uses_are_not_refused(tmp_path):
    """DINOv2 keeps a mask_token that only masked-image pretraining uses: plain BP leaves it alone too, so the
    first step's reach check lets it be (and still names parameters that the placement alone leaves out)."""
    model = FAMILIES["DINOv2"].build()
    mask_token = model.dinov2.embeddings.mask_token.detach().clone()
    data = Dataset.from_dict({k: v.tolist() for k, v in hf_images().items()}).with_format("torch")
    trainer = GrapeTrainer(model=model, train_dataset=data, args=args(
        tmp_path, rule="dfa", max_steps=1, per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True))
    trainer.train()
    assert torch.equal(model.dinov2.embeddings.mask_token, mask_token)
