"""The ceiling of any per-point linear feedback on `lm_fidelity.py`'s language model, and GrAPE next to it.

    python benchmarks/linear_feedback_ceiling.py --output_dir ceiling --runs --spec \
        '{"name": "oracle_s0.3", "rule": "dfa", "setting": "macro", "oracle": true, "block_lr_scale": 0.3}'
    LM_LAYERS=6 python benchmarks/linear_feedback_ceiling.py ...   # the same on a 6-layer model
    LM_LAYERS=12 LM_WIDTH=64 LM_HEADS=2 python benchmarks/linear_feedback_ceiling.py ...   # 12 x 64

`lm_fidelity.main` (same data, model, checkpoints, table) with measurement-only patches of the library's
classes, made here and nowhere else (they are not options of the library: the oracle uses BP):

- spec key "oracle": true (rule "dfa"): before every optimizer step's training forward, one extra observed
  BP forward/backward on the same batch (RNG forked, like the alignment probe) gives the true per-token
  gradient G_k = dL/dh_k at every point and the error E at the tap; B_k is set to the least-squares fit
  E B_k^T ~ G_k over the batch's tokens (ridge 1e-6 * mean eigenvalue: E is rank d-1, LN removes the mean).
  The step then trains as DFA with those B_k. The in-sample cos(E B^T, G) is logged as `alignment/<point>`
  (-> estimate_alignment); the probe's true alignment uses the B_k fitted on the previous step's batch.
  "oracle_norm": true keeps each B_k at the identity's Frobenius norm (sqrt d), as GrAPE's B keeps its
  init norm, to separate direction from scale. "oracle_lag": true fits B_k on each batch and uses it on the next
  (out of sample: what feedback that never sees the current batch's gradients can reach; in sample, B_k carries
  the batch's own gradients).
- spec key "oracle_points": [names] (rule "grape"): after GrAPE's update, those points' B_k come from the in-sample
  fit (which point limits GrAPE?).
- spec key "token_correction": gamma (rule "grape"): token-dependent feedback, B_k e_n + gamma u_k,n (r_n . e_n)
  with r_n the tap's tangent less what the matrices predict of it (see `targets` below): GrAPE's tangent used
  token by token (at gamma 1, unbiased for the token's own gradient J_k,n^T e_n).
- GrAPE with `"grape_track_scale": true` (a library option since these runs, which used the same
  rescaling in a patch here) is the scale-tracking row of `benchmarks/results/linear_feedback_ceiling.md`.
- env LM_LAYERS, LM_WIDTH, LM_HEADS: the shapes' n_layer, n_embd, n_head (the depth study: 3 x 96, 6 x 96, 12 x 64).
- `--depth_figure OUT.png FOLDER...`: the depth study's figure from the runs' `results.jsonl` (folders named
  `...<L>x<W>_<run>`), instead of running anything.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lm_fidelity, beside this file

import lm_fidelity  # noqa: E402

from grape_hf.direct.estimate import JacobianEstimator  # noqa: E402
from grape_hf.direct.matrices import FeedbackMatrices  # noqa: E402
from grape_hf.rules.dfa import DFA  # noqa: E402
from grape_hf.rules.grape import GrAPE  # noqa: E402

# The depth study's shapes: LM_LAYERS layers, LM_WIDTH wide with LM_HEADS heads (12 x 64 with 2 heads keeps the
# heads of 32 of the 96-wide shapes).
for variable, key in (("LM_LAYERS", "n_layer"), ("LM_WIDTH", "n_embd"), ("LM_HEADS", "n_head")):
    if os.environ.get(variable):
        for shape in lm_fidelity.SHAPES.values():
            shape[key] = int(os.environ[variable])

ORACLE = {"on": False, "norm": False, "lag": False, "points": (), "correction": 0.0, "fitted": None}
_train_one = lm_fidelity.train_one


def train_one(spec, *args, **kwargs):
    ORACLE["on"], ORACLE["norm"] = bool(spec.get("oracle")), bool(spec.get("oracle_norm"))
    ORACLE["lag"], ORACLE["fitted"] = bool(spec.get("oracle_lag")), None
    ORACLE["points"] = tuple(spec.get("oracle_points", ()))
    ORACLE["correction"] = float(spec.get("token_correction", 0))
    try:
        return _train_one(spec, *args, **kwargs)
    finally:
        ORACLE.update(on=False, lag=False, points=(), correction=0.0, fitted=None)


lm_fidelity.train_one = train_one
_forward = DFA.forward


def oracle_fit(rule, forward, inputs, only=None):
    """Set every B_k (or those of the points `only`) to the least-squares map from the error to the true per-token
    gradient on `inputs`."""
    with torch.random.fork_rng(devices=[]):
        with rule.observing() as seen:
            loss, _ = forward(inputs)
        names = list(seen.points)
        *grads, error = torch.autograd.grad(loss, [seen.points[n] for n in names] + [seen.z])
    e = error.reshape(-1, error.shape[-1]).float()
    gram = e.T @ e
    ridge = 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0])
    cosines = {}
    for name, grad in zip(names, grads):
        if only is not None and name not in only:
            continue
        g = grad.reshape(e.shape[0], -1).float()
        bt = torch.linalg.solve(gram + ridge, e.T @ g)  # (error_features, point_features): e @ bt ~ g
        b = bt.T.contiguous()
        if ORACLE["norm"]:
            b = b / b.norm() * b.shape[0] ** 0.5
        rule.network.matrix_for(name, seen.points[name], seen.z)  # create, then replace
        if ORACLE["lag"]:  # out of sample: this batch's fit serves the next step (this step: the last batch's)
            fitted = ORACLE["fitted"] = ORACLE["fitted"] or {}
            b, fitted[name] = fitted.get(name, rule.matrices.tensors[name]), b
        rule.matrices.tensors[name] = b
        cosines[name] = float(torch.nn.functional.cosine_similarity((e @ b.T).flatten(), g.flatten(), dim=0))
    rule.cosines.add(cosines)


def forward(self, forward, inputs, step, first_micro_batch):
    if ORACLE["on"]:
        if first_micro_batch:
            oracle_fit(self, forward, inputs)
        return forward(inputs)  # no measuring-only estimate: alignment/* holds the oracle's in-sample cosines
    return _forward(self, forward, inputs, step, first_micro_batch)


DFA.forward = forward
_grape_forward = GrAPE.forward


def grape_forward(self, forward, inputs, step, first_micro_batch):
    CORRECTION.clear()  # the last step's perturbations belong to the last batch
    result = _grape_forward(self, forward, inputs, step, first_micro_batch)
    if ORACLE["points"] and first_micro_batch:
        oracle_fit(self, forward, inputs, only=ORACLE["points"])
    return result


GrAPE.forward = grape_forward
_end_step = GrAPE.end_step


def end_step(self, skipped):
    CORRECTION.clear()  # used by this step's backward; the next probe (before the next forward) must not see it
    return _end_step(self, skipped)


GrAPE.end_step = end_step

# Token-dependent feedback (spec key "token_correction": gamma, rule "grape"): point k's feedback for token n is
# B_k e_n + gamma u_k,n (r_n . e_n), where r_n = d_n - sum_j u_j,n B_j is the tap's tangent less what the matrices
# (before the step's update) predict of it. E[u_k (r . e)] = (J_k - B_k^T)^T e over the token's own Jacobian, so at
# gamma 1 the feedback is an unbiased estimate of the within-token gradient J_k^T e: the forward-gradient correction
# of B_k e, token by token, with the matrices as control variate.
CORRECTION = {}
_targets = JacobianEstimator.targets


def targets(self, estimate, baselines=None):
    if ORACLE["correction"]:
        d = estimate.tangent.float()
        residual = d - sum(u.float() @ self.network.matrices.tensors[name].to(d.device)
                           for name, u in estimate.perturbations.items())
        CORRECTION.update(residual=residual, perturbations=dict(estimate.perturbations))
    return _targets(self, estimate, baselines)


JacobianEstimator.targets = targets
_project = FeedbackMatrices.project


def project(self, name, error, point_shape, dtype, positions=None):
    feedback = _project(self, name, error, point_shape, dtype, positions)
    if ORACLE["correction"] and CORRECTION and positions is None:
        scale = (CORRECTION["residual"] * error.float()).sum(-1, keepdim=True)  # r_n . e_n, (*lead, 1)
        u = CORRECTION["perturbations"][name].float()
        feedback = (feedback.float() + ORACLE["correction"] * u * scale).to(dtype)
    return feedback


FeedbackMatrices.project = project


def depth_figure(out: str, folders: list[str]) -> None:
    """The depth study's figure: eval loss and true alignment per depth (one column each) of every run whose
    `results.jsonl` is in `folders`, grouped by the run's shape (`<L>x<W>` in the folder's name)."""
    import json
    import re

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {}
    for folder in folders:
        shape = re.search(r"(\d+x\d+)", os.path.basename(folder.rstrip("/"))).group(1)
        path = os.path.join(folder, "results.jsonl")
        if not os.path.exists(path):  # a run not finished
            continue
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                runs.setdefault(shape, {})[r["spec"]["name"]] = r
    shapes = sorted(runs, key=lambda shape: int(shape.split("x")[0]))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for column, shape in enumerate(shapes):
        for name, r in sorted(runs[shape].items()):
            style = "--" if "oracle" in name else ":" if name.startswith(("bp", "dfa")) else "-"
            line, = axes[0][column].plot(*zip(*r["evals"]), style, label=name)
            if r["alignment"]:
                axes[1][column].plot([a[0] for a in r["alignment"]], [a[1] for a in r["alignment"]], style,
                                     color=line.get_color(), label=name)
        axes[0][column].set_title(f"GPT-2 {shape}: eval loss"), axes[1][column].set_title("true alignment")
        axes[1][column].set_xlabel("step"), axes[0][column].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--depth_figure"]:  # --depth_figure OUT.png FOLDER...
        sys.exit(depth_figure(sys.argv[2], sys.argv[3:]))
    sys.exit(lm_fidelity.main())
