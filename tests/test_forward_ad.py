"""The estimating forward's attention: same values and tangents as SDPA, no extra memory into the backward."""

import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.direct.forward_ad import (ATTENTION, Affine, BloomGelu, Softmax, attention_forward,
                                       estimating_kernels)
from tiny_models import tiny_gpt2, token_batch


def saved_bytes(fn) -> int:
    """Bytes of the tensors saved for backward by `fn()` that are alive after it returns."""
    saved = {}

    def pack(tensor):
        try:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        except RuntimeError:  # a dual wrapper
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        saved.setdefault(key, (size, []))[1].append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    live = sum(size for size, refs in saved.values() if any(ref() is not None for ref in refs))
    del out
    return live


def test_softmax_matches_torch_values_gradients_and_jvp():
    x, t, g = torch.randn(3, 4, 7, dtype=torch.float64).unbind(0)
    x.requires_grad_(True)
    ours, theirs = Softmax.apply(x, -1), torch.softmax(x, -1)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0])
    _, jvp_ours = torch.func.jvp(lambda v: Softmax.apply(v, -1), (x.detach(),), (t,))
    _, jvp_theirs = torch.func.jvp(lambda v: torch.softmax(v, -1), (x.detach(),), (t,))
    torch.testing.assert_close(jvp_ours, jvp_theirs)


def test_bloom_gelu_matches_transformers_values_gradients_and_jvp():
    from transformers.models.bloom.modeling_bloom import GeLUFunction, bloom_gelu_forward

    x, t, g = torch.randn(3, 4, 7, dtype=torch.float64).unbind(0)
    x.requires_grad_(True)
    ours, theirs = BloomGelu.apply(x), GeLUFunction.apply(x)
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0])
    # The jvp against forward AD through the formula's own ops (GeLUFunction has no jvp at all).
    _, jvp_ours = torch.func.jvp(BloomGelu.apply, (x.detach(),), (t,))
    _, jvp_formula = torch.func.jvp(bloom_gelu_forward, (x.detach(),), (t,))
    torch.testing.assert_close(jvp_ours, jvp_formula)
    with pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(GeLUFunction.apply, (x.detach(),), (t,))


def _grouped_mm_ops():
    import transformers.integrations.moe  # noqa: F401 (registers transformers' fallback op)

    return {"torch": torch._grouped_mm, "transformers_fallback": torch.ops.transformers.grouped_mm_fallback}


@pytest.mark.parametrize("op", ["torch", "transformers_fallback"])
def test_grouped_mm_gets_a_tangent_and_keeps_its_values_and_gradients(op):
    """While estimating, a grouped matmul (MoE experts) on a dual input: the op's own values and backward,
    and the tangent of per-group matmuls (torch has no forward-AD formula for it)."""
    func = _grouped_mm_ops()[op]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 10, 8, generator=g).unbind(0)  # 10 tokens sorted by group; dims of 16 bytes
    weight = torch.randn(3, 8, 12, generator=g, requires_grad=True)
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # group 1 is empty
    x.requires_grad_(True)
    groups = [(0, 3), (3, 3), (3, 10)]
    reference = torch.cat([x[a:b] @ weight[i] for i, (a, b) in enumerate(groups)])
    ref_tangent = torch.cat([t[a:b] @ weight[i].detach() for i, (a, b) in enumerate(groups)])
    with pytest.raises(RuntimeError, match="forward AD|forward-mode|jvp"), fwAD.dual_level():  # torch has none
        func(fwAD.make_dual(x, t), weight, offs=offs)

    with fwAD.dual_level(), estimating_kernels(nn.Identity()):
        out = func(fwAD.make_dual(x, t), weight, offs=offs)
        primal, tangent = fwAD.unpack_dual(out)
    torch.testing.assert_close(primal, reference)
    torch.testing.assert_close(tangent, ref_tangent)
    grad = torch.randn(primal.shape, generator=g)
    ours = torch.autograd.grad(primal, (x, weight), grad)
    theirs = torch.autograd.grad(reference, (x, weight), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_softmax_keeps_no_tangent_graph_into_the_backward():
    # torch's own softmax keeps its tangent's autograd graph alive with the primal graph; ours must not.
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(64, 64)

    def dual(softmax):
        with fwAD.dual_level():
            y = softmax(fwAD.make_dual(x, torch.randn_like(x)) @ w)
            return fwAD.unpack_dual(y).primal

    plain = saved_bytes(lambda: torch.softmax(x @ w, -1))
    assert saved_bytes(lambda: dual(lambda h: Softmax.apply(h, -1))) == plain
    assert saved_bytes(lambda: dual(lambda h: torch.softmax(h, -1))) > plain  # the leak this module avoids


@pytest.mark.parametrize("transposed", [True, False])
def test_affine_matches_torch_values_gradients_and_jvp(transposed):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 12, 5, generator=g, dtype=torch.float64).unbind(0)
    weight = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    w = weight if transposed else weight.T

    def reference(v):
        return F.linear(v, weight, bias) if transposed else torch.addmm(bias, v, w)

    x.requires_grad_(True)
    ours, theirs = Affine.apply(x, w, bias, transposed), reference(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias), grad), torch.autograd.grad(theirs, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b)
    with fwAD.dual_level(), estimating_kernels(nn.Module()):  # routes F.linear / torch.addmm to Affine
        dual = reference(fwAD.make_dual(x.detach(), t))
        assert type(dual.grad_fn).__name__.startswith("Affine")
        tangent = fwAD.unpack_dual(dual).tangent
    torch.testing.assert_close(tangent, t @ (weight.T if transposed else w))


class Attention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


@pytest.mark.parametrize("case", ["causal", "padding", "bidirectional", "gqa"])
def test_attention_matches_sdpa_values_and_tangents(case):
    g = torch.Generator().manual_seed(0)
    kv_heads = 2 if case == "gqa" else 4
    q = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, kv_heads, 6, 8, generator=g, dtype=torch.float64).unbind(0)
    tangents = tuple(torch.randn_like(a) for a in (q, k, v))
    module = Attention(causal=case != "bidirectional").eval()
    mask = None
    if case == "padding":  # boolean, True = attend, causal included (what `sdpa_mask` builds)
        mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6).clone()
        mask[1, :, :, :2] = False
        mask[1, :, :2, 0] = True  # every row attends somewhere

    def ours(q, k, v):
        return attention_forward(module, q, k, v, mask)[0]

    def reference(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and module.is_causal,
                                                 enable_gqa=kv_heads != 4)
        return out.transpose(1, 2)

    out, tangent = torch.func.jvp(ours, (q, k, v), tangents)
    ref_out, ref_tangent = torch.func.jvp(reference, (q, k, v), tangents)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tangent, ref_tangent)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_estimating_forward_restores_attention_and_holds_no_more_than_dfa(tmp_path, implementation):
    batch = token_batch()
    held = {}
    for rule in ("dfa", "grape"):
        model = tiny_gpt2()
        model.set_attn_implementation(implementation)
        trainer = GrapeTrainer(model=model, args=GrapeTrainingArguments(output_dir=str(tmp_path), rule=rule,
                                                                        report_to="none", use_cpu=True))
        held[rule] = saved_bytes(lambda: trainer.compute_loss(model, batch))
        assert model.config._attn_implementation == implementation
    assert ATTENTION != implementation
    # GrAPE's dual forward may hold a few small extras, never activations' worth. (Not yet Llama: 1.17x on
    # a tiny one, tangent-op tensors of its MLP stay alive; see the README's speed section.)
    assert held["grape"] <= 1.05 * held["dfa"], held
