"""Every rule's weight update equals its formula, written here by hand in plain torch.

On a 3-layer MLP (two hidden ReLU layers and the classifier: x -> W1 -> h1 -> W2 -> h2 -> W3 -> z),
one GrapeTrainer step with plain SGD (no clipping, no decay) must move every weight by exactly
`-lr * g`, with `g` the rule's gradient from the formulas below (no autograd, no grape_hf hooks):

    e  = (softmax(z) - y*) / N                       the mean cross-entropy's error at the logits
    BP      d3 = e,  d2 = (d3 W3) * relu'(a2),  d1 = (d2 W2) * relu'(a1)
    FA      d3 = e,  d2 = (d3 B3) * relu'(a2),  d1 = (d2 B2) * relu'(a1)        (Lillicrap et al. 2016)
    DFA     d3 = e,  d2 = (e B_2^T) * relu'(a2),  d1 = (e B_1^T) * relu'(a1)      (Nøkland 2016)
    DRTP    d3 = e,  d2 = (y*/N B_2^T) * relu'(a2),  d1 = (y*/N B_1^T) * relu'(a1) (Frenkel et al. 2021)
    gW_l = d_l^T h_{l-1},  gb_l = sum_n d_l
    PEPITA  e' = softmax(z) - y*, second pass on x' = x - e' F^T giving h1', h2':
            gW1 = ((h1 - h1')/N)^T x',  gW2 = ((h2 - h2')/N)^T h1',  gW3 = (e'/N)^T h2'  (Dellaferrera & Kreiman 2022)
    MeZO    z_W ~ N(0, I) per weight from its step seed, L(.) the mean cross-entropy,
            g = (L(W + eps z) - L(W - eps z)) / (2 eps),  gW = g z_W               (Malladi et al. 2023)

GrAPE's feedback step (the estimate T_k = mean_n outer(u_k, d) and one SGD step on 1 - cos(B_k, T_k))
is checked the same way against a hand-written tangent and autograd on the cosine's definition.
"""

import hashlib

import pytest
import torch
from torch.nn.functional import cross_entropy, one_hot, softmax

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.direct.matrices import FeedbackMatrices
from grape_hf.models import MLPConfig, MLPForImageClassification
from grape_hf.rules import RULES

N, SIDE, HIDDEN, CLASSES, LR = 8, 4, 12, 5, 0.5
MEZO_EPS = 0.1  # large enough that g, a difference of two float32 losses, is exact to ~1e-6
PARAMS = {"W1": "layers.0.linear.weight", "b1": "layers.0.linear.bias", "W2": "layers.1.linear.weight",
          "b2": "layers.1.linear.bias", "W3": "classifier.weight", "b3": "classifier.bias"}


def mlp(seed: int = 0) -> MLPForImageClassification:
    torch.manual_seed(seed)
    return MLPForImageClassification(MLPConfig(num_channels=1, image_size=SIDE, hidden_size=HIDDEN, num_hidden_layers=2,
                                               num_labels=CLASSES))


def batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(N, 1, SIDE, SIDE, generator=g),
            "labels": torch.randint(0, CLASSES, (N,), generator=g)}


def forward(w: dict, x: torch.Tensor) -> tuple:
    """(a1, h1, a2, h2, z) of the MLP with weights `w` on flattened images x (N, 16)."""
    a1 = x @ w["W1"].T + w["b1"]
    h1 = a1.relu()
    a2 = h1 @ w["W2"].T + w["b2"]
    h2 = a2.relu()
    return a1, h1, a2, h2, h2 @ w["W3"].T + w["b3"]


def layer_grads(deltas: list, inputs: list) -> dict:
    """gW_l = d_l^T h_{l-1}, gb_l = sum_n d_l for l = 1, 2, 3."""
    grads = {}
    for l, (d, h) in enumerate(zip(deltas, inputs), start=1):
        grads[f"W{l}"], grads[f"b{l}"] = d.T @ h, d.sum(0)
    return grads


def mezo_direction(key: str, like: torch.Tensor) -> torch.Tensor:
    """MeZO's z of step 0 for the parameter of `key`: N(0, I) seeded by sha256("<feedback_seed>:mezo:<step>:<name>")."""
    digest = hashlib.sha256(f"0:mezo:0:{PARAMS[key]}".encode()).digest()
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))


def reference_gradients(rule: str, w: dict, x: torch.Tensor, labels: torch.Tensor, matrices: dict) -> dict:
    target = one_hot(labels, CLASSES).float()
    if rule == "mezo":
        z = {key: mezo_direction(key, value) for key, value in w.items()}
        plus, minus = ({key: w[key] + sign * MEZO_EPS * z[key] for key in w} for sign in (1, -1))
        loss_plus, loss_minus = (cross_entropy(forward(weights, x)[-1], labels) for weights in (plus, minus))
        g = (loss_plus - loss_minus) / (2 * MEZO_EPS)
        return {key: g * z[key] for key in w}
    a1, h1, a2, h2, z = forward(w, x)
    e = (softmax(z, dim=-1) - target) / N
    if rule == "pepita":
        e_example = softmax(z, dim=-1) - target
        x_mod = x - e_example @ matrices["input"].T
        _, h1_mod, _, h2_mod, _ = forward(w, x_mod)
        return layer_grads([(h1 - h1_mod) / N, (h2 - h2_mod) / N, e_example / N], [x_mod, h1_mod, h2_mod])
    if rule == "bp":
        d2 = (e @ w["W3"]) * (a2 > 0)
        d1 = (d2 @ w["W2"]) * (a1 > 0)
    elif rule == "fa":
        d2 = (e @ matrices["classifier"]) * (a2 > 0)
        d1 = (d2 @ matrices["layers.1.linear"]) * (a1 > 0)
    else:
        signal = e if rule == "dfa" else target / N
        d2 = (signal @ matrices["layers.1"].T) * (a2 > 0)
        d1 = (signal @ matrices["layers.0"].T) * (a1 > 0)
    return layer_grads([d1, d2, e], [x, h1, h2])


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "drtp", "pepita", "mezo"])
def test_one_step_equals_the_rule_formula(rule, tmp_path):
    model = mlp()
    data = batch()
    before = {key: model.get_parameter(name).detach().clone() for key, name in PARAMS.items()}
    examples = [{"pixel_values": data["pixel_values"][i], "labels": data["labels"][i]} for i in range(N)]
    args = GrapeTrainingArguments(output_dir=str(tmp_path), rule=rule, optim="sgd", learning_rate=LR,
                                  lr_scheduler_type="constant", max_grad_norm=0.0, max_steps=1,
                                  per_device_train_batch_size=N, report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, seed=0, mezo_eps=MEZO_EPS)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=examples)
    trainer.train()

    matrices = {} if trainer.feedback is None else trainer.feedback.matrices.tensors
    expected = reference_gradients(rule, before, data["pixel_values"].flatten(1), data["labels"], matrices)
    for key, name in PARAMS.items():
        step = model.get_parameter(name).detach() - before[key]
        torch.testing.assert_close(step, -LR * expected[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{rule} {key}: {m}")
    # The rules differ where they should: the first layer's update is not BP's (BP is the reference itself).
    if rule != "bp":
        bp = reference_gradients("bp", before, data["pixel_values"].flatten(1), data["labels"], {})
        cos = torch.nn.functional.cosine_similarity(expected["W1"].flatten(), bp["W1"].flatten(), dim=0)
        assert cos < 0.99, f"{rule}'s first-layer update is BP's"


def reference_align_step(matrix: torch.Tensor, target: torch.Tensor, lr: float) -> torch.Tensor:
    """One SGD step on 1 - cos(B, T) for the unit-norm B (autograd on the definition), then B's norm back."""
    unit = (matrix / matrix.norm()).requires_grad_()
    cos = (unit * target).sum() / (unit.norm() * target.norm())
    (grad,) = torch.autograd.grad(1 - cos, unit)
    stepped = unit.detach() - lr * grad
    return stepped / stepped.norm() * matrix.norm()


def test_grape_feedback_step_equals_its_formula(tmp_path):
    model = mlp()
    data = batch()
    args = GrapeTrainingArguments(output_dir=str(tmp_path), rule="grape", grape_lr=0.2, grape_smoothing="none",
                                  grape_track_scale=False, report_to="none", use_cpu=True, seed=0)  # the paper's step
    network = RULES["grape"](model, args)
    network.training_forward(lambda b: (model(**b).loss, None), data, step=0, first_micro_batch=True)

    # The perturbations the points drew: the estimator's seeded generator, in forward order.
    generator = torch.Generator().manual_seed(network.estimator.seed)
    u1, u2 = (torch.randn(N, HIDDEN, generator=generator) for _ in range(2))
    w = {key: model.get_parameter(name).detach() for key, name in PARAMS.items()}
    _, _, a2, _, _ = forward(w, data["pixel_values"].flatten(1))
    # The forward tangent reaching the logits: u1 through W2, relu'(a2), plus u2; then W3.
    d = (((u1 @ w["W2"].T) * (a2 > 0)) + u2) @ w["W3"].T
    seeded = FeedbackMatrices(network.args.feedback_init, args.feedback_seed)  # as resolved for the model
    for name, u in (("layers.0", u1), ("layers.1", u2)):
        estimate = u.T @ d / N  # T_k = mean_n outer(u_k, d), (hidden, classes)
        initial = seeded.get(name, HIDDEN, CLASSES, torch.device("cpu"))
        expected = reference_align_step(initial, estimate, args.grape_lr)
        torch.testing.assert_close(network.matrices.tensors[name], expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(expected, initial, atol=1e-4)  # the step did something
    network.remove()
