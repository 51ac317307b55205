"""Attention for GrAPE's estimating forward: forward-mode AD that holds no extra memory into the backward.

While dual tensors are live, attention must run on ops with forward-AD formulas (SDPA's fused
kernels have none). Eager attention has them, but torch's own softmax formula keeps its tangent's
autograd graph (4 tensors the size of the attention matrix) alive as long as the primal graph, so
into the backward: that was most of GrAPE's extra activation memory on a GPT-2 (measured with
`benchmarks/step_time.py`; a softmax with the explicit jvp below holds exactly what BP holds).
So the estimating forward switches the model, through transformers' `AttentionInterface`, to
`attention_forward` (eager attention with that softmax), and back afterwards. Models that do not
dispatch through the interface run SDPA on its MATH backend.

Linear layers: torch's forward-AD formula of `addmm`/`linear` materialises zero tangents for the
weight and bias and multiplies by them, two matmuls where the tangent needs one (`t W^T`): a dual
`nn.Linear` cost 3.4x a plain one on this CPU instead of 2x. While estimating, `Affine` (an
explicit jvp, the same backward) replaces them for inputs whose weight has no tangent.
"""

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
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


class Affine(torch.autograd.Function):
    """`x W^T + b` (`transposed`, as `F.linear`) or `x W + b` (as `torch.addmm(b, x, W)`), with the jvp
    `t W^T` (or `t W`) of an input tangent `t` alone: the weight and bias carry no tangent."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
        if transposed:
            return F.linear(x, weight, bias)
        return torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.transposed = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight if ctx.transposed else grad @ weight.T
        if ctx.needs_input_grad[1]:
            flat_x = x.reshape(-1, x.shape[-1])
            grad_weight = flat_grad.T @ flat_x if ctx.transposed else flat_x.T @ flat_grad
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = flat_grad.sum(0)
        return grad_x, grad_weight, grad_bias, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, *_):
        (weight,) = ctx.saved_tensors
        return tangent @ (weight.T if ctx.transposed else weight)


def _has_tangent(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and fwAD.unpack_dual(tensor).tangent is not None


class _EstimatingOps(TorchFunctionMode):
    """Route `F.linear` and `torch.addmm` (GPT-2's Conv1D) whose only tangent is the input's to `Affine`
    (not under autocast, which casts inside the native ops)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in (F.linear, torch.addmm) or torch.is_autocast_enabled(args[0].device.type):
            return func(*args, **kwargs)  # autocast casts inside the native ops only: keep them (bf16, fp16)
        if func is F.linear and not kwargs:
            x, weight, bias = (*args, None)[:3] if len(args) == 2 else args
            if _has_tangent(x) and not _has_tangent(weight) and not _has_tangent(bias):
                return Affine.apply(x, weight, bias, True)
        elif func is torch.addmm and not kwargs and len(args) == 3:
            bias, x, weight = args
            if _has_tangent(x) and not _has_tangent(weight) and not _has_tangent(bias):
                return Affine.apply(x, weight, bias, False)
        return func(*args, **kwargs)


@contextlib.contextmanager
def estimating_kernels(model):
    """Inside: `model`'s attention on `attention_forward` (its own implementation restored after), and
    linear layers on `Affine`."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "_attn_implementation", None)
    switch = chosen is not None and hasattr(model, "_can_set_attn_implementation") and model._can_set_attn_implementation()
    if switch:
        model.set_attn_implementation(ATTENTION)
    try:
        with sdpa_kernel(SDPBackend.MATH), _EstimatingOps():  # MATH: models that call SDPA directly
            yield
    finally:
        if switch:
            model.set_attn_implementation(chosen)
