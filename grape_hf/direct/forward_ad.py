"""Kernels for GrAPE's estimating forward: forward-mode AD at the cost of one more forward, no more memory.

The estimating forward runs the model on dual tensors (`forward_ad.dual_level()`). torch's own
forward-AD formulas are general but costly here: they record the tangent's ops in autograd (its
inputs involve parameters that require grad), which holds tangent-sized tensors alive and may keep
them into the backward; they materialise zero tangents for the weights and multiply by them; and a
Python-composed op (GPT-2's GELU, 8 ops) gets the formula of each of its ops. So the heavy ops run
as *split kernels*: the primal through the op's own code (its own values, autograd graph and
backward, exactly what a DFA step runs), the tangent by an explicit jvp under `no_grad` (its
history is never used: `network._cut_tensor` drops it at the next point anyway), joined by
`make_dual`. Each is tested against torch's values, gradients and tangents (tests/test_forward_ad.py).
On `benchmarks/step_time.py`'s GPT-2 (4 x 256) one estimating forward went from 2178 dispatched aten
ops to 1214 (BP's forward: 335), and GrAPE's step from 1.52-1.58x BP's CPU time to 1.27-1.29x.

- linear layers (`F.linear`, `torch.addmm` of GPT-2's Conv1D), input tangent `t` only: `t W^T`;
- `F.layer_norm`: the normalisation's Jacobian is symmetric, so its jvp is its own backward kernel
  applied to `t` (`native_layer_norm_backward` without weight), times the weight;
- `F.gelu`, `F.silu` and the modules of `JVP_MODULES` (GPT-2's `NewGELUActivation`): `f'(x) t` by the
  op's backward kernel;
- attention (`attention_forward`, switched in through transformers' `AttentionInterface`): eager
  attention on the primals (SDPA's fused kernels have no forward AD; models that call SDPA directly
  run its MATH backend), tangent `dO = dP V + P dV`, `dP = P * (dS - rowsum(P * dS))`;
- ops with no forward-AD formula at all: the grouped matmul of Mixture-of-Experts layers
  (`torch._grouped_mm`, transformers' CPU fallback op; Mixtral, Qwen2-MoE), linear in its input
  (`grouped_mm_with_tangent`); module classes whose forward is a custom `autograd.Function` without
  `jvp` (BLOOM's GELU), swapped through `JVP_MODULES` for a Function with an explicit jvp.
Anything else runs on torch's own formulas; an op without one is refused, naming the module
(`estimate.estimating_forward`).
"""

import contextlib
import functools

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION = "grape_forward_ad"  # name registered with transformers' attention and mask interfaces


def _unpack(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(primal, tangent or None) of `tensor` at the current forward-AD level, as `fwAD.unpack_dual`, without
    its Python wrapper (an export check and an import per call: 7-14 us, a few hundred calls a forward)."""
    level = fwAD._current_level
    return (tensor, None) if level < 0 else torch._unpack_dual(tensor, level)


def _joined(out: torch.Tensor, tangent: torch.Tensor | None) -> torch.Tensor:
    """`out` (with its autograd graph) carrying `tangent` (no history) as its forward-AD tangent; with grad
    mode on (`make_dual` under `no_grad` would cut `out` from its graph). `torch._make_dual` is what
    `fwAD.make_dual` runs after its checks (floating point: the kernels' outputs are) and its one-time load
    of torch's jvp decompositions (`estimating_kernels` makes sure of it)."""
    if tangent is None:
        return out
    return torch._make_dual(out, tangent if tangent.dtype == out.dtype else tangent.to(out.dtype),
                            level=fwAD._current_level)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None, **kwargs):
    """`eager_attention_with_tangent`; inside `estimating_kernels`, with its op routing off: none of its ops
    is routed, and routing each of them (about 45 torch calls) through Python cost about 0.2 ms a layer."""
    if isinstance(torch.overrides._get_current_function_mode(), _EstimatingOps):
        with torch.overrides._pop_mode_temporarily():
            return eager_attention_with_tangent(module, query, key, value, attention_mask, scaling, dropout,
                                                is_causal)
    return eager_attention_with_tangent(module, query, key, value, attention_mask, scaling, dropout, is_causal)


def eager_attention_with_tangent(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                 is_causal=None):
    """Eager attention, in transformers' `AttentionInterface` signature, on dual or plain tensors.

    The primal is eager attention on the primals (softmax in at least float32, as eager attention does
    for half precision); the tangent, computed without autograd history from the tangents `dq, dk, dv`
    (any may be absent): `dS = (dq K^T + Q dk^T) * scaling`, `dP = P * (dS - rowsum(P * dS))`, and
    `dO = dP' V + P' dV` with `P'` the dropped-out weights, `dP' = P' * (dS - rowsum(P * dS))` (dropout
    scales `P` and `dP` alike; masked entries have `P = 0`, so their tangent is 0).

    Args:
        query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim).
        attention_mask: None, or (batch, 1, q_len, kv_len), boolean (True = attend, from `sdpa_mask`) or additive.
        is_causal: with no mask, whether to mask the future (default: the module's `is_causal`).
    Returns:
        (batch, q_len, heads, head_dim) output (dual when an input is) and the (batch, heads, q_len, kv_len)
        attention weights (after dropout, without tangent).
    """
    (q, dq), (k, dk), (v, dv) = (_unpack(a) for a in (query, key, value))
    batch, heads, q_len, head_dim = q.shape
    groups = heads // k.shape[1]
    # Matmuls on (batch * heads) batches of contiguous copies, each made once and shared by the primal and
    # the tangent (`torch.matmul` copies its operands again for each product, a transposed key twice).
    # Sums of products by `torch.baddbmm`, out of place, so that autocast casts them.
    q, key_t, v = _batched(q, 1), _batched(k.transpose(2, 3), groups), _batched(v, groups)
    kv_len = key_t.shape[-1]
    scaling = head_dim ** -0.5 if scaling is None else scaling
    scores = torch.bmm(q, key_t).view(batch, heads, q_len, kv_len) * scaling
    if attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", False)):
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1)
    weights = F.dropout(probs.to(q.dtype), p=dropout, training=module.training)
    flat_weights = weights.reshape(batch * heads, q_len, kv_len)
    out = torch.bmm(flat_weights, v).view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    if dq is None and dk is None and dv is None:
        return out, weights
    with torch.no_grad():
        d_out = None
        if dq is not None or dk is not None:
            d_scores = torch.bmm(_batched(dq, 1), key_t) if dq is not None else None
            if dk is not None:
                dk_t = _batched(dk.transpose(2, 3), groups)
                d_scores = torch.bmm(q, dk_t) if d_scores is None else torch.baddbmm(d_scores, q, dk_t)
            d_scores = d_scores.view(batch, heads, q_len, kv_len).to(probs.dtype).mul_(scaling)
            d_scores -= (probs * d_scores).sum(-1, keepdim=True)
            d_weights = d_scores.mul_(weights).to(q.dtype)  # dP' = P' * (dS - rowsum(P * dS))
            d_out = torch.bmm(d_weights.view(batch * heads, q_len, kv_len), v)
        if dv is not None:
            dv = _batched(dv, groups)
            d_out = torch.bmm(flat_weights, dv) if d_out is None else torch.baddbmm(d_out, flat_weights, dv)
        d_out = d_out.view(batch, heads, q_len, head_dim).transpose(1, 2).contiguous()
    return _joined(out, d_out), weights


def _batched(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    """(batch, kv_heads, m, n) -> (batch * kv_heads * groups, m, n), contiguous, each head repeated `groups`
    times (grouped-query attention, as transformers' `repeat_kv`)."""
    tensor = repeat_kv(tensor, groups)
    return tensor.reshape(-1, *tensor.shape[2:]).contiguous()


AttentionInterface.register(ATTENTION, attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def _arguments(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list | None:
    """The values of `names` (the last ones defaulting to `defaults`) from a call's args and kwargs, or
    None when the call has arguments that `names` does not cover (then the op runs as torch's own)."""
    if len(args) > len(names) or not set(kwargs) <= set(names[len(args):]):
        return None
    optional = dict(zip(names[len(names) - len(defaults):], defaults))
    return [*args, *(kwargs.get(name, optional.get(name)) for name in names[len(args):])]


def _split(value) -> tuple:
    """(primal, tangent) of a dual tensor; (value, None) for anything else."""
    return _unpack(value) if isinstance(value, torch.Tensor) else (value, None)


def _constant(value) -> bool:
    """Whether `value` carries no tangent: None, a parameter (never dual: `make_dual` returns a new
    tensor), or a tensor without one."""
    return value is None or isinstance(value, nn.Parameter) or not _has_tangent(value)


def _linear(func, args, kwargs):
    """`F.linear(x, W, b)`: tangent `t W^T`."""
    values = _arguments(args, kwargs, ("input", "weight", "bias"), (None,))
    if values is None:
        return NotImplemented
    (x, t), weight, bias = _split(values[0]), values[1], values[2]
    if t is None or not _constant(weight) or not _constant(bias):
        return NotImplemented
    out = func(x, weight, bias)
    with torch.no_grad():
        tangent = F.linear(t, weight)
    return _joined(out, tangent)


def _addmm(func, args, kwargs):
    """`torch.addmm(b, x, W)` (GPT-2's Conv1D), plain `beta` and `alpha`: tangent `t W`."""
    if kwargs or len(args) != 3:
        return NotImplemented
    bias, (x, t), weight = args[0], _split(args[1]), args[2]
    if t is None or not _constant(weight) or not _constant(bias):
        return NotImplemented
    out = func(bias, x, weight)
    with torch.no_grad():
        tangent = torch.mm(t, weight)
    return _joined(out, tangent)


def _layer_norm(func, args, kwargs):
    """`F.layer_norm(x, shape, w, b, eps)`: tangent `w * J t`, `J` the normalisation's Jacobian, which is
    symmetric, so `J t` is its backward kernel on `t` (no weight). Not under autocast, which runs
    `layer_norm` in float32 where `native_layer_norm` keeps the input's dtype."""
    values = _arguments(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
    if values is None:
        return NotImplemented
    (x, t), shape, weight, bias, eps = _split(values[0]), *values[1:]
    if t is None or not _constant(weight) or not _constant(bias) or torch.is_autocast_enabled(x.device.type):
        return NotImplemented
    out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)  # what F.layer_norm runs
    with torch.no_grad():
        tangent = torch.ops.aten.native_layer_norm_backward.default(t, x, shape, mean, rstd, None, None,
                                                                     [True, False, False])[0]
        if weight is not None:
            tangent.mul_(weight)
    return _joined(out, tangent)


def elementwise_with_tangent(forward, derivative, x: torch.Tensor) -> torch.Tensor:
    """`forward(x)` for an elementwise `forward` with `derivative(t, x) = forward'(x) t`: `forward` runs on
    the primal (its own values and backward), the tangent comes from `derivative` without history."""
    primal, tangent = _unpack(x)
    if tangent is None:
        return forward(x)
    out = forward(primal)
    with torch.no_grad():
        tangent = derivative(tangent, primal)
    return _joined(out, tangent)


def _gelu(func, args, kwargs):
    """`F.gelu(x, approximate)`: tangent `gelu'(x) t`, by `gelu_backward`."""
    values = _arguments(args, kwargs, ("input", "approximate"), ("none",))
    if values is None or not _has_tangent(values[0]):
        return NotImplemented
    approximate = values[1]
    return elementwise_with_tangent(functools.partial(func, approximate=approximate), functools.partial(
        torch.ops.aten.gelu_backward.default, approximate=approximate), values[0])


def _silu(func, args, kwargs):
    """`F.silu(x)` (not in place): tangent `silu'(x) t`, by `silu_backward`."""
    values = _arguments(args, kwargs, ("input", "inplace"), (False,))
    if values is None or values[1] or not _has_tangent(values[0]):
        return NotImplemented
    return elementwise_with_tangent(func, torch.ops.aten.silu_backward.default, values[0])


# The derivative of GPT-2's tanh GELU, `(t, x) -> gelu'(x) t`: the op's own backward kernel.
_TANH_GELU = functools.partial(torch.ops.aten.gelu_backward.default, approximate="tanh")


def _has_tangent(tensor) -> bool:
    return isinstance(tensor, torch.Tensor) and _unpack(tensor)[1] is not None


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


# Module class name -> a factory of the forward used in place of the module's own (given the module's
# own) while estimating: same values and gradients, an explicit jvp. BLOOM's GELU runs a custom
# autograd.Function that has no jvp; GPT-2's `NewGELUActivation` (tanh GELU in 8 ops, 0.5 x (1 +
# tanh(sqrt(2 / pi) (x + 0.044715 x^3)))) would take the forward-AD formula of each of its ops.
JVP_MODULES = {
    "BloomGelu": lambda own: BloomGelu.apply,
    "NewGELUActivation": lambda own: functools.partial(elementwise_with_tangent, own, _TANH_GELU),
}


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


def _grouped_mm(func, args, kwargs):
    if not args or not _has_tangent(args[0]) or any(_has_tangent(a) for a in (*args[1:], *kwargs.values())):
        return NotImplemented
    return grouped_mm_with_tangent(func, args, kwargs)


# torch function -> its split kernel, which returns NotImplemented where torch's own formula must run.
_KERNELS = {F.linear: _linear, torch.addmm: _addmm, F.layer_norm: _layer_norm, F.gelu: _gelu, F.silu: _silu}
_ROUTED: dict = {}  # every function seen -> its kernel or None (grouped matmuls are recognised once)


class _EstimatingOps(TorchFunctionMode):
    """Route the ops of `_KERNELS`, and grouped matmuls, to their kernels. Every torch call of the
    estimating forward passes here, so the common case costs one dict lookup."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            kernel = _ROUTED[func]
        except KeyError:
            kernel = _KERNELS.get(func) or (_grouped_mm if _is_grouped_mm(func) else None)
            if len(_ROUTED) < 4096:  # torch's functions, a bounded set; the bound only guards against surprises
                _ROUTED[func] = kernel
        except TypeError:  # not hashable: not one of ours
            kernel = None
        if kernel is not None:
            out = kernel(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def estimating_kernels(model):
    """Inside: `model`'s attention on `attention_forward` (its own implementation restored after), the ops
    of `_KERNELS` and grouped matmuls on their kernels, and the modules of `JVP_MODULES` on their forward
    with an explicit jvp (their own restored after)."""
    config = getattr(model, "config", None)
    chosen = getattr(config, "_attn_implementation", None)
    switch = chosen is not None and hasattr(model, "_can_set_attn_implementation") and model._can_set_attn_implementation()
    # Not a module whose forward was already replaced on the instance (by its user): that one is theirs.
    swapped = [module for module in model.modules()
               if type(module).__name__ in JVP_MODULES and "forward" not in vars(module)]
    fwAD._maybe_load_decompositions()  # what `fwAD.make_dual` does first, which `_joined` skips
    if switch:
        model.set_attn_implementation(ATTENTION)
    for module in swapped:
        module.forward = JVP_MODULES[type(module).__name__](module.forward)  # on the instance: the class's stays
    try:
        with sdpa_kernel(SDPBackend.MATH), _EstimatingOps():  # MATH: models that call SDPA directly
            yield
    finally:
        for module in swapped:
            del module.forward
        if switch:
            model.set_attn_implementation(chosen)
