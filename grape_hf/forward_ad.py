"""Attention for GrAPE's estimating forward: forward-mode AD that holds no extra memory into the backward.

While dual tensors are live, attention must run on ops with forward-AD formulas (SDPA's fused
kernels have none). Eager attention has them, but torch's own softmax formula keeps its tangent's
autograd graph (4 tensors the size of the attention matrix) alive as long as the primal graph, so
into the backward: that was most of GrAPE's extra activation memory on a GPT-2 (measured with
`benchmarks/step_time.py`; a softmax with the explicit jvp below holds exactly what BP holds).
So the estimating forward switches the model, through transformers' `AttentionInterface`, to
`attention_forward` (eager attention with that softmax), and back afterwards. Models that do not
dispatch through the interface run SDPA on its MATH backend.
"""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "grape_forward_ad"  # name registered with transformers' attention and mask interfaces


class Softmax(torch.autograd.Function):
    """`softmax(x, dim)` with an explicit jvp `y * (t - sum(y * t))`, computed from the saved output."""

    @staticmethod
    def forward(x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.softmax(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, y, ctx.dim, y.dtype), None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _):
        (y,) = ctx.saved_tensors
        return y * (tangent - (y * tangent).sum(ctx.dim, keepdim=True))


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    """Eager attention with `Softmax`, in transformers' `AttentionInterface` signature.

    Args:
        query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim).
        attention_mask: None, or (batch, 1, q_len, kv_len), boolean (True = attend, from `sdpa_mask`) or additive.
        is_causal: with no mask, whether to mask the future (default: the module's `is_causal`).
    Returns:
        (batch, q_len, heads, head_dim) output and the (batch, heads, q_len, kv_len) attention weights.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        q_len, kv_len = scores.shape[-2:]
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    # In at least float32, as eager attention does for half precision.
    weights = Softmax.apply(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def forward_ad_attention(model):
    """Run `model`'s attention on `attention_forward` inside, its own implementation restored after."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "_attn_implementation", None)
    switch = chosen is not None and hasattr(model, "_can_set_attn_implementation") and model._can_set_attn_implementation()
    if switch:
        model.set_attn_implementation(ATTENTION)
    try:
        with sdpa_kernel(SDPBackend.MATH):  # models that call SDPA directly
            yield
    finally:
        if switch:
            model.set_attn_implementation(chosen)
