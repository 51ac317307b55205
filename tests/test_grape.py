"""GrAPE: the forward-mode estimate, its unbiasedness, the feedback update, and its errors."""

import copy

import pytest
import torch
from tiny_models import image_batch, tiny_gpt2, tiny_llama, tiny_vit, token_batch
from torch.nn.attention import SDPBackend, sdpa_kernel

from transformers import Trainer, TrainingArguments

from grape_hf import GrapeTrainer, GrapeTrainingArguments, audit_locality
from grape_hf.direct.placement import EMBEDDINGS
from grape_hf.rules import RULES
from grape_hf.direct.estimate import cosine, estimating_forward, jacobian_estimate, residual_estimates
from grape_hf.rules.grape import align_step

# GPT-2 (Conv1D addmm, NewGELU, LayerNorm), Llama (grouped-query attention, SiLU, RMSNorm), ViT (exact GELU):
# every kernel of `direct/forward_ad.py` on a real model.
FAMILIES = {"gpt2": (tiny_gpt2, token_batch), "llama": (tiny_llama, token_batch), "vit": (tiny_vit, image_batch)}


def grape_args(tmp_path, **kwargs):
    return GrapeTrainingArguments(output_dir=str(tmp_path), rule="grape", report_to="none", **kwargs)


def tap_as_function(model, network, point, batch):
    """z as a function of point `point`'s tensor, on a plain (hook-free) `model`: the rest of the
    forward recomputed from it, as the true Jacobian J_k = dz/dh_k sees it."""
    placement = network.placement
    block = placement.embedding_block if point == EMBEDDINGS else point
    head = model.get_submodule(placement.head)

    def f(h):
        captured = []
        if point == EMBEDDINGS:
            replace = model.get_submodule(block).register_forward_pre_hook(lambda m, a: (h, *a[1:]))
        else:
            replace = model.get_submodule(block).register_forward_hook(
                lambda m, a, o: (h, *o[1:]) if isinstance(o, tuple) else h)
        if placement.error_point == "head_input":
            tap = head.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        else:
            tap = head.register_forward_hook(lambda m, a, o: captured.append(o))
        try:
            model(**batch)
        finally:
            replace.remove()
            tap.remove()
        return captured[0]
    return f


def estimate_once(model, network, batch, seed=0):
    """One estimating forward: returns (perturbations u_k, tangent d, point tensors h_k)."""
    recorded = {}
    generator = torch.Generator().manual_seed(seed)

    def draw(name, like):
        recorded[name] = like
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    with estimating_forward(network.network, model, draw) as estimate:
        model(**batch)
    return dict(estimate.perturbations), estimate.tangent, recorded


@pytest.mark.parametrize("setting", ["macro", "micro"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tangent_at_tap_is_sum_of_jacobian_products(family, setting, tmp_path):
    make_model, make_batch = FAMILIES[family]
    model, batch = make_model(), make_batch()
    plain = copy.deepcopy(model)
    network = RULES["grape"](model, grape_args(tmp_path, setting=setting))
    u, d, h = estimate_once(model, network, batch)
    assert set(u) == set(network.point_names)

    expected = torch.zeros_like(d)
    with sdpa_kernel(SDPBackend.MATH):
        for point in network.point_names:
            f = tap_as_function(plain, network, point, batch)
            _, jvp = torch.func.jvp(f, (h[point].detach(),), (u[point],))
            expected += jvp
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-5)


def test_estimate_is_unbiased(tmp_path):
    """Averaged over draws, T_k approaches J_k^T (mean over positions of the diagonal Jacobian blocks)."""
    model = tiny_gpt2(n_layer=1)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids.repeat(256, 1)}  # 256 draws per forward on the same sequence
    network = RULES["grape"](model, grape_args(tmp_path, setting="macro"))
    sums = {}
    for draw in range(20):
        u, d, h = estimate_once(model, network, batch, seed=draw)
        for point in network.point_names:
            sums[point] = sums.get(point, 0) + jacobian_estimate(u[point], d)

    single = {"input_ids": ids}
    for point in network.point_names:
        h0 = h[point][:1].detach()
        jac = torch.autograd.functional.jacobian(tap_as_function(plain, network, point, single), h0)
        # (1, T, e, 1, T, p): the diagonal blocks dz_n/dh_n, averaged over positions n, transposed.
        truth = torch.stack([jac[0, n, :, 0, n, :] for n in range(ids.shape[1])]).mean(0).T
        cos = torch.nn.functional.cosine_similarity(sums[point].flatten(), truth.flatten(), dim=0)
        assert cos > 0.95, (point, float(cos))


def test_residual_estimate_is_unbiased_and_shrinks_with_alignment(tmp_path):
    """`grape_estimator='residual'`: averaged over draws it approaches J_k^T whatever the matrices (here random:
    unbiased), and with matrices equal to J_k^T one draw lands far nearer than the plain estimate (its noise comes
    from J_j - B_j^T, not from every point's whole J_j)."""
    model = tiny_gpt2(n_layer=2)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(3))
    batch, single = {"input_ids": ids.repeat(256, 1)}, {"input_ids": ids}
    network = RULES["grape"](model, grape_args(tmp_path, setting="macro"))
    u, d, h = estimate_once(model, network, batch)
    truth = {}
    for point in network.point_names:
        jac = torch.autograd.functional.jacobian(tap_as_function(plain, network, point, single), h[point][:1].detach())
        truth[point] = torch.stack([jac[0, n, :, 0, n, :] for n in range(ids.shape[1])]).mean(0).T
    g = torch.Generator().manual_seed(1)
    random = {p: torch.randn(t.shape, generator=g) * t.norm() / t.numel() ** 0.5 for p, t in truth.items()}
    no_positions = dict.fromkeys(truth)
    aligned = residual_estimates(u, d, no_positions, truth)
    for point in network.point_names:
        error = lambda t: float((t - truth[point]).norm() / truth[point].norm())  # noqa: E731
        assert error(aligned[point]) < 0.3 * error(jacobian_estimate(u[point], d)), point
    sums = {}
    for draw in range(20):
        u, d, _ = estimate_once(model, network, batch, seed=draw)
        for point, t in residual_estimates(u, d, no_positions, random).items():
            sums[point] = sums.get(point, 0) + t
    for point in network.point_names:
        assert torch.nn.functional.cosine_similarity(sums[point].flatten(), truth[point].flatten(), dim=0) > 0.95


def test_residual_estimator_reaches_the_update(tmp_path):
    """The option is not ignored: from the same seed, the second estimate (the first has no guess yet: no target)
    differs from the plain one by the control variate."""
    targets = {}
    for estimator in ("outer", "residual"):
        torch.manual_seed(0)
        args = grape_args(tmp_path / estimator, grape_estimator=estimator, grape_smoothing="none", max_steps=2,
                          per_device_train_batch_size=4, learning_rate=0.0, use_cpu=True)
        trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset())
        trainer.train()
        targets[estimator] = dict(trainer.feedback.targets)
    for point, outer in targets["outer"].items():
        assert not torch.allclose(outer, targets["residual"][point]), point


def test_estimate_stride_estimates_on_every_nth_row_apart(tmp_path):
    """`grape_estimate_stride=2` on 8 rows: the estimate is the one the training forward of rows 0, 2, 4, 6 alone
    would carry (same perturbations), and the training forward is the plain one, without tangents."""
    batch = token_batch(batch=8)
    plain_loss = tiny_gpt2()(**batch).loss
    targets = {}
    for name, stride, inputs in (("part", 2, batch), ("whole", 1, {k: v[::2] for k, v in batch.items()})):
        model = tiny_gpt2()
        rule = RULES["grape"](model, grape_args(tmp_path / name, grape_estimate_stride=stride,
                                                grape_smoothing="none"))
        loss, _ = rule.training_forward(lambda b: (model(**b).loss, None), inputs, 0, True)
        targets[name] = dict(rule.targets)
        if name == "part":
            assert torch.equal(loss, plain_loss)
            assert torch.autograd.forward_ad.unpack_dual(loss).tangent is None
    assert rule.estimator.estimates_seen == 1 and set(targets["part"]) == set(rule.point_names)
    for point, target in targets["part"].items():
        torch.testing.assert_close(target, targets["whole"][point], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alignment", ["frobenius", "columns"])
def test_update_raises_cosine_and_keeps_norm(alignment):
    g = torch.Generator().manual_seed(0)
    matrix, target = torch.randn(48, 16, generator=g), torch.randn(48, 16, generator=g)
    norms = matrix.norm() if alignment == "frobenius" else matrix.norm(dim=0)
    previous = cosine(matrix, target, alignment)
    for _ in range(50):
        matrix = align_step(matrix, target, lr=0.05, alignment=alignment)
        now = cosine(matrix, target, alignment)
        assert now > previous
        previous = now
    torch.testing.assert_close(matrix.norm() if alignment == "frobenius" else matrix.norm(dim=0), norms)
    assert previous > 0.9


@pytest.mark.parametrize("alignment", ["frobenius", "columns"])
def test_tracked_scale_reaches_the_target_itself(alignment):
    """With `grape_track_scale`, B turns towards T and takes T's length along its direction: repeated steps
    reach T itself (direction and norm); where T points against B, B keeps its norm."""
    g = torch.Generator().manual_seed(0)
    matrix, target = torch.randn(48, 16, generator=g), 3 * torch.randn(48, 16, generator=g)
    for _ in range(400):
        matrix = align_step(matrix, target, lr=0.05, alignment=alignment, track_scale=True)
    torch.testing.assert_close(matrix, target, rtol=0, atol=1e-3 * float(target.abs().max()))
    opposed = align_step(-target, target, lr=0.05, alignment=alignment, track_scale=True)
    dim = None if alignment == "frobenius" else 0
    torch.testing.assert_close(opposed.norm(dim=dim), target.norm(dim=dim))


def test_dual_forward_keeps_dfa_gradients(tmp_path):
    """With the same B_k, the estimating (dual) forward gives DFA's parameter gradients exactly."""
    model, batch = tiny_gpt2(), token_batch()
    plain = copy.deepcopy(model)
    dfa = RULES["dfa"](plain, grape_args(tmp_path, setting="micro"))
    network = RULES["grape"](model, grape_args(tmp_path, setting="micro"))
    plain(**batch).loss.backward()
    network.matrices.tensors = dict(dfa.matrices.tensors)  # the same B_k, no update in between
    with network.as_trained():
        loss = model(**batch).loss
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("setting", ["macro", "micro"])
def test_audit_passes_under_grape(setting, tmp_path):
    assert audit_locality(tiny_gpt2(), token_batch(), grape_args(tmp_path, setting=setting)).ok
    assert audit_locality(tiny_vit(), image_batch(), grape_args(tmp_path, setting=setting)).ok


def test_grape_trains_and_logs_alignment(tmp_path):
    """Through the Trainer: the matrices move towards the estimates and the cosines are logged."""
    data = lm_dataset()
    args = grape_args(tmp_path, setting="macro", max_steps=6, logging_steps=3, per_device_train_batch_size=8,
                      grape_lr=0.2, grape_smoothing="ema", use_cpu=True, save_strategy="no",
                      disable_tqdm=True, feedback_init="normal", block_lr_scale=1.0, grape_track_scale=False)
    trainer = GrapeTrainer(model=tiny_gpt2(), args=args, train_dataset=data)  # from random B, the paper's setting
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "alignment/mean" in entry]
    assert len(logs) == 2
    assert logs[1]["alignment/mean"] > logs[0]["alignment/mean"] > 0
    assert set(trainer.feedback.targets) == set(trainer.feedback.point_names)


@pytest.mark.parametrize("bad, match", [
    (dict(grape_lr=0.0), "grape_lr=0.0 must be > 0"),
    (dict(grape_alignment="rows"), "grape_alignment='rows' is not valid.*'frobenius', 'columns'"),
    (dict(grape_smoothing="median"), "grape_smoothing='median' is not valid.*'cma'"),
    (dict(grape_update_steps=4, grape_smoothing="none"), "set grape_smoothing"),
])
def test_bad_grape_arguments(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        grape_args(tmp_path, **bad)


class NoForwardAD(torch.autograd.Function):
    """An op with a backward formula and no forward-AD (jvp) formula."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def test_op_without_forward_ad_is_named(tmp_path):
    model, batch = tiny_gpt2(), token_batch()
    act = model.transformer.h[0].mlp.act
    act.forward = lambda x: NoForwardAD.apply(x)
    network = RULES["grape"](model, grape_args(tmp_path, setting="macro"))
    with pytest.raises(RuntimeError, match=r"forward AD through every op of GPT2LMHeadModel, and one in "
                                           r"transformer\.h\.0\.mlp\.act \(NewGELUActivation\) has none: .*jvp"):
        network.training_forward(lambda b: (model(**b).loss, None), batch, step=0, first_micro_batch=True)


def tiny_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2, hidden_dropout=0.0,
                                        attention_dropout=0.0))


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32))


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32,
                                              moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              num_experts=4, num_experts_per_tok=2, max_position_embeddings=32))


def _use_formula_gelu(model):
    """BLOOM with its GELU as the plain formula (ops with forward AD): the reference for our jvp."""
    from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

    for block in model.transformer.h:
        block.mlp.gelu_impl.forward = bloom_gelu_forward


# Models whose ops have no forward AD in torch (a custom autograd Function, grouped matmuls), and how to
# run the same model on ops that have it (transformers' eager experts loop, the GELU formula).
NO_FORWARD_AD = {
    "bloom": (tiny_bloom, _use_formula_gelu),
    "mixtral": (tiny_mixtral, lambda model: model.set_experts_implementation("eager")),
    "qwen2_moe": (tiny_qwen2_moe, lambda model: model.set_experts_implementation("eager")),
}


@pytest.mark.parametrize("family", list(NO_FORWARD_AD))
def test_tangent_through_ops_without_forward_ad(family, tmp_path):
    """The estimating forward's tangent at the tap through BLOOM's GELU and the experts' grouped
    matmul equals the one through reference ops that have forward AD, under the same draws."""
    make_model, to_reference = NO_FORWARD_AD[family]
    model, batch = make_model(), token_batch()
    reference = copy.deepcopy(model)
    to_reference(reference)
    tangents = []
    for m in (model, reference):
        network = RULES["grape"](m, grape_args(tmp_path, setting="macro"))
        _, d, _ = estimate_once(m, network, batch)
        tangents.append(d)
        network.remove()
    assert tangents[0].abs().sum() > 0
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(NO_FORWARD_AD))
def test_grape_trains_through_ops_without_forward_ad(family, tmp_path):
    """GrAPE trains BLOOM, Mixtral and Qwen2-MoE (their stock implementations): finite loss, every
    parameter below the head moves, the audit passes, and the model's own forward is restored."""
    make_model, _ = NO_FORWARD_AD[family]
    model = make_model()
    experts = getattr(model.config, "_experts_implementation", None)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = grape_args(tmp_path, setting="macro", max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                      use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    unmoved = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    assert not unmoved, unmoved
    assert all("forward" not in vars(module) for module in model.modules())  # no swapped forward left
    assert getattr(model.config, "_experts_implementation", None) == experts
    assert audit_locality(make_model(), token_batch(), grape_args(tmp_path, setting="macro")).ok


def lm_dataset(rows=16):
    import datasets

    batch = token_batch(batch=rows, length=16)
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def train_weights(tmp_path, trainer_class, **kwargs):
    args_class = GrapeTrainingArguments if trainer_class is GrapeTrainer else TrainingArguments
    args = args_class(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                      report_to="none", save_strategy="no", disable_tqdm=True, seed=0, **kwargs)
    trainer = trainer_class(model=tiny_gpt2(), args=args, train_dataset=lm_dataset())
    trainer.train()
    return trainer, {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("rule", ["dfa", "grape"])
def test_bp_calibration_every_step_is_bp(rule, tmp_path):
    """bp_calibration_steps=1 makes every step a true BP step: the stock Trainer's weights, exactly."""
    _, bp = train_weights(tmp_path / "bp", Trainer)
    # One learning rate for every parameter, as the stock Trainer has (the LM's recommended blocks run at 0.3 x).
    _, calibrated = train_weights(tmp_path / "cal", GrapeTrainer, rule=rule, bp_calibration_steps=1,
                                  block_lr_scale=1.0)
    _, plain = train_weights(tmp_path / "plain", GrapeTrainer, rule=rule)
    assert all(torch.equal(bp[k], calibrated[k]) for k in bp)
    assert not all(torch.equal(bp[k], plain[k]) for k in bp)


def test_true_alignment_probe_logs_and_changes_nothing(tmp_path):
    probed, with_probe = train_weights(tmp_path / "probe", GrapeTrainer, rule="dfa", alignment_probe_steps=1,
                                       logging_steps=1)
    _, without = train_weights(tmp_path / "none", GrapeTrainer, rule="dfa")
    # Bitwise: the probe's forwards (true alignment, DFA's dual estimate) are its own, never the training forward.
    for k in without:
        assert torch.equal(with_probe[k], without[k]), k
    logs = [e for e in probed.state.log_history if "true_alignment/mean" in e]
    assert len(logs) == 3
    for entry in logs:
        cosines = [v for k, v in entry.items() if k.startswith("true_alignment/") and k != "true_alignment/mean"]
        assert len(cosines) == len(probed.feedback.point_names)
        assert all(-1 <= c <= 1 for c in cosines)
    assert (tmp_path / "probe" / "alignment.png").stat().st_size > 1000



def test_dfa_logs_the_same_alignment_figures(tmp_path):
    """With the probe on, DFA logs cos(B_k, T_k) as GrAPE does, and its matrices never move."""
    trainer, _ = train_weights(tmp_path, GrapeTrainer, rule="dfa", alignment_probe_steps=1, logging_steps=3)
    before = {k: v.clone() for k, v in trainer.feedback.matrices.tensors.items()}
    logged = trainer.state.log_history[0]
    assert {f"alignment/{p}" for p in trainer.feedback.point_names} <= set(logged)
    assert {f"true_alignment/{p}" for p in trainer.feedback.point_names} <= set(logged)
    assert all(-1 <= v <= 1 for k, v in logged.items() if "alignment/" in k)
    trainer.train()  # 3 more steps
    assert all(torch.equal(before[k], v) for k, v in trainer.feedback.matrices.tensors.items())
