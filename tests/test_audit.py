"""The locality audit passes on every supported family and setting, and names a leak when there is one."""

import dataclasses
import re

import pytest
from tiny_models import FAMILIES as ALL_FAMILIES
from tiny_models import image_batch, tiny_gpt2, tiny_llama, tiny_vit, token_batch

from grape_hf import (
    GrapeTrainingArguments,
    LocalityError,
    audit_locality,
    resolve_placement,
)
from grape_hf.diagnostics.audit import audit_network
from grape_hf.direct.network import TAP
from grape_hf.rules import DFA

FAMILIES = {"gpt2": (tiny_gpt2, token_batch), "llama": (tiny_llama, token_batch), "vit": (tiny_vit, image_batch)}


def dfa_args(tmp_path, **kwargs):
    return GrapeTrainingArguments(output_dir=str(tmp_path), rule="dfa", report_to="none", **kwargs)


@pytest.mark.parametrize("setting", ["macro", "micro"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_audit_passes(family, setting, tmp_path):
    make_model, make_batch = FAMILIES[family]
    model = make_model()
    report = audit_locality(model, make_batch(), dfa_args(tmp_path, setting=setting))
    assert report.ok and not report.leaks
    # Every point trains a non-empty segment, and the segments are disjoint.
    segments = [set(names) for source, names in report.receivers.items() if source != TAP]
    assert all(segments)
    assert sum(map(len, segments)) == len(set().union(*segments))
    # The audit removed its hooks: the model is hook-free again.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_audit_knows_tied_parameters(tmp_path):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    report = audit_locality(model, token_batch(), dfa_args(tmp_path, setting="macro"))
    assert "transformer.wte.weight" in report.receivers["embeddings"]


def test_embeddings_without_point_are_cut(tmp_path):
    report = audit_locality(tiny_gpt2(), token_batch(), dfa_args(tmp_path, setting="micro", feedback_embeddings=False))
    assert "embeddings" not in report.receivers
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(report.unreached)


def test_broken_placement_fails_and_names_the_leak(tmp_path):
    """Without the cuts, the residual stream carries the embeddings' true gradient from every point."""
    model = tiny_gpt2()
    args = dfa_args(tmp_path, setting="micro", feedback_embeddings=False)
    broken = dataclasses.replace(resolve_placement(model, args), cuts=())
    network = DFA(model, args, placement=broken)
    with pytest.raises(LocalityError, match=r"LEAK transformer\.wte\.weight receives gradient from "
                                            r"transformer\.h\.0\.attn, transformer\.h\.0\.mlp"):
        audit_network(model, network, token_batch())
    report = audit_network(model, network, token_batch(), raise_on_leak=False)
    assert set(report.leaks) == {"transformer.wte.weight", "transformer.wpe.weight"}



def family_args(tmp_path, setting="micro"):
    return dfa_args(tmp_path / setting, setting=setting)


def test_parallel_branches_share_their_input_norm(tmp_path):
    """Phi runs attention and MLP on one input norm: both points reach it, which the audit knows
    (`Placement.shared`); forgotten, it is reported as the leak it would otherwise look like."""
    model = ALL_FAMILIES["Phi"].build()
    batch = token_batch()
    args = family_args(tmp_path)
    report = audit_locality(model, batch, args)
    norm = "model.layers.0.input_layernorm.weight"
    assert norm in report.receivers["model.layers.0.self_attn"] and norm in report.receivers["model.layers.0.mlp"]
    forgotten = dataclasses.replace(resolve_placement(model, args), shared=())
    rule = DFA(model, args, placement=forgotten)
    try:
        with pytest.raises(LocalityError, match=rf"LEAK {re.escape(norm)} receives gradient from "
                                                r"model\.layers\.0\.self_attn, model\.layers\.0\.mlp"):
            audit_network(model, rule, batch)
    finally:
        rule.remove()


@pytest.mark.parametrize("family, point, member", [
    ("Gemma-2", "model.layers.0.post_attention_layernorm", "model.layers.0.post_attention_layernorm.weight"),
    ("DINOv2", "dinov2.encoder.layer.0.layer_scale1", "dinov2.encoder.layer.0.layer_scale1.lambda1"),
    ("BEiT", "beit.layers.0", "beit.layers.0.lambda_1"),  # a bare parameter: the block's own point trains it
    ("OPT", "model.decoder.layers.0", "model.decoder.layers.0.fc2.weight"),  # fc2 runs on (tokens, d)
])
def test_micro_points_sit_after_post_branch_norms_and_layer_scales(tmp_path, family, point, member):
    model = ALL_FAMILIES[family].build()
    batch = token_batch(length=8) if ALL_FAMILIES[family].kind == "lm" else image_batch()
    report = audit_locality(model, batch, family_args(tmp_path))
    assert member in report.receivers[point]
