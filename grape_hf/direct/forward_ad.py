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

Ops with no forward-AD formula at all get one here, so GrAPE runs on the models that use them:
- the grouped matmul of Mixture-of-Experts layers (`torch._grouped_mm`, transformers' CPU fallback op;
  Mixtral, Qwen2-MoE): linear in its input, so its tangent is the same op on the input's tangent
  (`grouped_mm_with_tangent`), the primal keeping the op's own backward;
- module classes whose forward is a custom `autograd.Function` without `jvp` (BLOOM's GELU):
  `JVP_MODULES` swaps their forward, while estimating, for a Function with the same forward and
  backward and an explicit jvp.
Anything else without forward AD is refused, naming the module (`estimate.estimating_forward`).
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


class BloomGelu(torch.autograd.Function):
    """BLOOM's tanh-approximated GELU with its own forward and backward (transformers' `bloom_gelu_forward`
    and `bloom_gelu_back`, as its `GeLUFunction`) and the jvp `gelu'(x) t`, which is that backward applied
    to the tangent (the op is elementwise)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

        return bloom_gelu_forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        from transformers.models.bloom.modeling_bloom import bloom_gelu_back

        return bloom_gelu_back(grad, ctx.saved_tensors)  # it unpacks the saved tuple itself

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor):
        from transformers.models.bloom.modeling_bloom import bloom_gelu_back

        return bloom_gelu_back(tangent, ctx.saved_tensors)


# Module class name -> a forward with an explicit jvp, used in place of the module's own while
# estimating (its own runs a custom autograd.Function that has none). Same values and gradients.
JVP_MODULES = {"BloomGelu": BloomGelu.apply}


def _is_grouped_mm(func) -> bool:
    """Whether `func` is a grouped matmul: torch's (`torch._grouped_mm`, `F.grouped_mm`) or transformers'
    fallback custom op for it (`torch.ops.transformers.grouped_mm_fallback`, packet or overload)."""
    if func is torch._grouped_mm or func is getattr(F, "grouped_mm", None):
        return True
    packet = getattr(func, "overloadpacket", func)  # an OpOverload's packet, or the packet itself
    return getattr(packet, "_qualified_op_name", None) == "transformers::grouped_mm_fallback"


def grouped_mm_with_tangent(func, args, kwargs):
    """`func(mat_a, mat_b, offs, ...)`, a grouped matmul, when only `mat_a` carries a tangent `t`: the
    primal runs the op itself (its own backward, unchanged), and the tangent is `func(t, mat_b, offs)`,
    the op being linear in `mat_a` (a bias adds no tangent). The tangent is computed without autograd
    history, which nothing uses (see `network._cut_tensor`).

    Args:
        args, kwargs: the op's: mat_a (tokens, in) sorted by group, mat_b (groups, in, out), offs (groups,).
    Returns:
        (tokens, out), dual.
    """
    mat_a, *rest = args
    primal, tangent = fwAD.unpack_dual(mat_a)
    out = func(primal, *rest, **kwargs)
    rest = [fwAD.unpack_dual(a).primal if isinstance(a, torch.Tensor) else a for a in rest]
    if len(rest) > 2:  # positional bias of torch._grouped_mm(mat_a, mat_b, offs, bias, out_dtype)
        rest[2] = None
    tangent_kwargs = {**kwargs, "bias": None} if "bias" in kwargs else kwargs
    with torch.no_grad():
        out_tangent = func(tangent, *rest, **tangent_kwargs)
    return fwAD.make_dual(out, out_tangent)


class _EstimatingOps(TorchFunctionMode):
    """Route `F.linear` and `torch.addmm` (GPT-2's Conv1D) whose only tangent is the input's to `Affine`
    (not under autocast, which casts inside the native ops), and grouped matmuls whose only tangent is
    the input's to `grouped_mm_with_tangent` (they do not autocast: transformers casts for them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_grouped_mm(func) and args and _has_tangent(args[0]):
            others = (*args[1:], *kwargs.values())
            if not any(_has_tangent(a) for a in others):
                return grouped_mm_with_tangent(func, args, kwargs)
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
    """Inside: `model`'s attention on `attention_forward` (its own implementation restored after), linear
    layers on `Affine`, grouped matmuls with their tangent, and the modules of `JVP_MODULES` on their
    forward with a jvp (their own restored after)."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "_attn_implementation", None)
    switch = chosen is not None and hasattr(model, "_can_set_attn_implementation") and model._can_set_attn_implementation()
    # Not a module whose forward was already replaced on the instance (by its user): that one is theirs.
    swapped = [module for module in model.modules()
               if type(module).__name__ in JVP_MODULES and "forward" not in vars(module)]
    if switch:
        model.set_attn_implementation(ATTENTION)
    for module in swapped:
        module.forward = JVP_MODULES[type(module).__name__]  # an instance attribute: the class's stays
    try:
        with sdpa_kernel(SDPBackend.MATH), _EstimatingOps():  # MATH: models that call SDPA directly
            yield
    finally:
        for module in swapped:
            del module.forward
        if switch:
            model.set_attn_implementation(chosen)
