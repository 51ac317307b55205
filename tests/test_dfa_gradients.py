"""DFA's gradients equal the rule's formula, computed here independently of grape_hf's hooks.

On an untouched copy of the model the test reads the error `e = dL/dz` at the tap with autograd,
then takes, for every segment k, the local `torch.autograd.grad` of its output `h_k` w.r.t. its own
parameters with `B_k e` injected (the matrices are the library's, the segments the test's own).
The head above the tap gets the true gradient with `z` held fixed. The library's gradients, from
one ordinary `loss.backward()`, must equal the sum of these. A point with positions under an error
without them (ViT's and BERT's logits) gets `B_k e` at every position, weighted 1/m over the m
positions the attention mask marks as real and 0 on padding.
"""

import copy

import pytest
import torch
from test_variable_length import padded_batch, tiny_bert
from tiny_models import image_batch, tiny_gpt2, tiny_vit, token_batch

from grape_hf import GrapeTrainingArguments
from grape_hf.rules import RULES

# Per family and setting: point name -> (module whose output is h_k, or the block whose input it is,
# the parameter-name prefixes of its segment). Written out by hand from the architectures.
GPT2_SEGMENTS = {
    "macro": lambda n: {"embeddings": ("transformer.h.0", ["transformer.wte.", "transformer.wpe."])}
    | {f"transformer.h.{i}": (f"transformer.h.{i}", [f"transformer.h.{i}."]) for i in range(n)},
    "micro": lambda n: {"embeddings": ("transformer.h.0", ["transformer.wte.", "transformer.wpe."])}
    | {f"transformer.h.{i}.attn": (f"transformer.h.{i}.attn", [f"transformer.h.{i}.ln_1.", f"transformer.h.{i}.attn."])
       for i in range(n)}
    | {f"transformer.h.{i}.mlp": (f"transformer.h.{i}.mlp", [f"transformer.h.{i}.ln_2.", f"transformer.h.{i}.mlp."])
       for i in range(n)},
}
VIT_SEGMENTS = {
    "macro": lambda n: {"embeddings": ("vit.layers.0", ["vit.embeddings."])}
    | {f"vit.layers.{i}": (f"vit.layers.{i}", [f"vit.layers.{i}."]) for i in range(n)},
    "micro": lambda n: {"embeddings": ("vit.layers.0", ["vit.embeddings."])}
    | {f"vit.layers.{i}.attention": (f"vit.layers.{i}.attention",
                                     [f"vit.layers.{i}.layernorm_before.", f"vit.layers.{i}.attention."])
       for i in range(n)}
    | {f"vit.layers.{i}.mlp": (f"vit.layers.{i}.mlp", [f"vit.layers.{i}.layernorm_after.", f"vit.layers.{i}.mlp."])
       for i in range(n)},
}
BERT_SEGMENTS = {
    "macro": lambda n: {"embeddings": ("bert.encoder.layer.0", ["bert.embeddings."])}
    | {f"bert.encoder.layer.{i}": (f"bert.encoder.layer.{i}", [f"bert.encoder.layer.{i}."]) for i in range(n)},
}
# family -> (model, batch, segments, tap module, tap side, parameters between the last point and the tap,
# GrapeTrainingArguments fields)
FAMILIES = {
    # The causal-LM default, error_point="residual": the tap is the final norm's input.
    "gpt2": (tiny_gpt2, token_batch, GPT2_SEGMENTS, "transformer.ln_f", "input", [], {}),
    # DFA as examples/run_wikitext.py runs it: B_k = I, applied without its matmul (`FeedbackMatrices.project`).
    "gpt2_identity": (tiny_gpt2, token_batch, GPT2_SEGMENTS, "transformer.ln_f", "input", [],
                      {"feedback_init": "identity"}),
    "gpt2_head_input": (tiny_gpt2, token_batch, GPT2_SEGMENTS, "lm_head", "input", ["transformer.ln_f."],
                        {"error_point": "head_input"}),
    "vit": (tiny_vit, image_batch, VIT_SEGMENTS, "classifier", "output", ["vit.layernorm.", "classifier."], {}),
    # A classifier on a dynamically padded batch: its blocks' positions vary, the error has none.
    "bert": (tiny_bert, padded_batch, BERT_SEGMENTS, "classifier", "output", ["bert.pooler.", "classifier."], {}),
}


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def expected_dfa_gradients(model, batch, segments, tap_module, tap_side, tap_segment, matrices):
    """Gradients DFA prescribes, from autograd on the plain model (no grape_hf hooks)."""
    outputs, inputs = {}, {}
    hooks = []
    for point, (module_name, _) in segments.items():
        module = model.get_submodule(module_name)
        if point == "embeddings":
            hooks.append(module.register_forward_pre_hook(lambda m, a, k, p=point: inputs.__setitem__(p, a[0]),
                                                          with_kwargs=True))
        else:
            hooks.append(module.register_forward_hook(lambda m, a, o, p=point: outputs.__setitem__(p, _first(o))))
    taps = {}

    # The test's own cut at the tap: the head sees a leaf copy of z, so the loss's backward gives
    # e = dL/dz and the head's true gradient, and stops there.
    def cut_input(module, args):
        taps["z"] = args[0]
        taps["leaf"] = args[0].detach().requires_grad_()
        return (taps["leaf"],)

    def cut_output(module, args, output):
        taps["z"] = output
        taps["leaf"] = output.detach().requires_grad_()
        return taps["leaf"]

    head = model.get_submodule(tap_module)
    hooks.append(head.register_forward_pre_hook(cut_input) if tap_side == "input"
                 else head.register_forward_hook(cut_output))
    loss = model(**batch).loss
    for h in hooks:
        h.remove()

    params = dict(model.named_parameters())
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    head_grads = torch.autograd.grad(loss, [taps["leaf"]] + list(params.values()), allow_unused=True)
    error = head_grads[0]
    for name, g in zip(params, head_grads[1:]):
        if g is not None:
            expected[name] += g

    def add_local(output, prefixes, grad_output):
        names = [n for n in params if any(n.startswith(p) for p in prefixes)]
        assert names, prefixes
        grads = torch.autograd.grad(output, [params[n] for n in names], grad_output, retain_graph=True,
                                    allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                expected[n] += g

    if tap_segment:  # none when the tap is the last point's own output stream (error_point="residual")
        add_local(taps["z"], tap_segment, error)
    lead = error.dim() - 1
    mask = batch.get("attention_mask")
    for point, (_, prefixes) in segments.items():
        h = inputs[point] if point == "embeddings" else outputs[point]
        B = matrices[point]
        if h.dim() == error.dim() + 1:  # (batch, positions, d) under (batch, classes): broadcast
            assert B.shape == (h.shape[-1], error.shape[-1])
            real = torch.ones(h.shape[:-1]) if mask is None else mask.float()
            feedback = (error @ B.T).unsqueeze(-2) * (real / real.sum(-1, keepdim=True)).unsqueeze(-1)
        else:
            assert B.shape == (h[(0,) * lead].numel(), error.shape[-1])
            feedback = (error.reshape(-1, error.shape[-1]) @ B.T).reshape(h.shape)
        add_local(h, prefixes, feedback)
    # GPT-2's tied input embedding and head are one parameter (named once): both terms landed on it.
    return expected


@pytest.mark.parametrize("family, setting", [("gpt2", "macro"), ("gpt2", "micro"), ("gpt2_identity", "micro"),
                                             ("gpt2_head_input", "macro"),
                                             ("gpt2_head_input", "micro"), ("vit", "macro"), ("vit", "micro"),
                                             ("bert", "macro")])
def test_dfa_gradients_equal_the_rule(family, setting, tmp_path):
    make_model, make_batch, segments, tap_module, tap_side, tap_segment, fields = FAMILIES[family]
    model = make_model()
    reference = copy.deepcopy(model)
    batch = make_batch()
    args = GrapeTrainingArguments(output_dir=str(tmp_path), rule="dfa", setting=setting, report_to="none", **fields)
    network = RULES["dfa"](model, args)
    points = segments[setting](2)
    assert sorted(network.point_names) == sorted(points)

    model(**batch).loss.backward()
    got = {name: p.grad for name, p in model.named_parameters()}

    expected = expected_dfa_gradients(copy.deepcopy(reference), batch, points, tap_module, tap_side, tap_segment,
                                      network.matrices.tensors)
    for name, g in got.items():
        assert g is not None, f"{name} received no gradient"
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # And DFA is not BP: the first block's gradients differ from the true ones.
    reference(**batch).loss.backward()
    first_segment = points[list(points)[1]][1]
    names = [n for n, _ in reference.named_parameters() if any(n.startswith(s) for s in first_segment)]
    bp = torch.cat([reference.get_parameter(n).grad.flatten() for n in names])
    dfa = torch.cat([got[n].flatten() for n in names])
    assert torch.nn.functional.cosine_similarity(bp, dfa, dim=0) < 0.99
