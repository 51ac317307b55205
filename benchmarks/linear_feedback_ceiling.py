"""The ceiling of any per-point linear feedback on `lm_fidelity.py`'s language model, and GrAPE next to it.

    python benchmarks/linear_feedback_ceiling.py --output_dir ceiling --runs --spec \
        '{"name": "oracle_s0.3", "rule": "dfa", "setting": "macro", "oracle": true, "block_lr_scale": 0.3}'
    LM_LAYERS=6 python benchmarks/linear_feedback_ceiling.py ...   # the same on a 6-layer model

`lm_fidelity.main` (same data, model, checkpoints, table) with measurement-only patches of the library's
classes, made here and nowhere else (they are not options of the library: the oracle uses BP):

- spec key "oracle": true (rule "dfa"): before every optimizer step's training forward, one extra observed
  BP forward/backward on the same batch (RNG forked, like the alignment probe) gives the true per-token
  gradient G_k = dL/dh_k at every point and the error E at the tap; B_k is set to the least-squares fit
  E B_k^T ~ G_k over the batch's tokens (ridge 1e-6 * mean eigenvalue: E is rank d-1, LN removes the mean).
  The step then trains as DFA with those B_k. The in-sample cos(E B^T, G) is logged as `alignment/<point>`
  (-> estimate_alignment); the probe's true alignment uses the B_k fitted on the previous step's batch.
  "oracle_norm": true keeps each B_k at the identity's Frobenius norm (sqrt d), as GrAPE's B keeps its
  init norm, to separate direction from scale.
- GrAPE with `"grape_track_scale": true` (a library option since these runs, which used the same
  rescaling in a patch here) is the scale-tracking row of `benchmarks/results/linear_feedback_ceiling.md`.
- env LM_LAYERS=n: the shapes' n_layer (depth study).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lm_fidelity, beside this file

import lm_fidelity  # noqa: E402

from grape_hf.rules.dfa import DFA  # noqa: E402

if os.environ.get("LM_LAYERS"):
    for shape in lm_fidelity.SHAPES.values():
        shape["n_layer"] = int(os.environ["LM_LAYERS"])

ORACLE = {"on": False, "norm": False}
_train_one = lm_fidelity.train_one


def train_one(spec, *args, **kwargs):
    ORACLE["on"], ORACLE["norm"] = bool(spec.get("oracle")), bool(spec.get("oracle_norm"))
    try:
        return _train_one(spec, *args, **kwargs)
    finally:
        ORACLE["on"] = False


lm_fidelity.train_one = train_one
_forward = DFA.forward


def oracle_fit(rule, forward, inputs):
    """Set every B_k to the least-squares map from the error to the true per-token gradient on `inputs`."""
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
        g = grad.reshape(e.shape[0], -1).float()
        bt = torch.linalg.solve(gram + ridge, e.T @ g)  # (error_features, point_features): e @ bt ~ g
        b = bt.T.contiguous()
        if ORACLE["norm"]:
            b = b / b.norm() * b.shape[0] ** 0.5
        rule.network.matrix_for(name, seen.points[name], seen.z)  # create, then replace
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

if __name__ == "__main__":
    sys.exit(lm_fidelity.main())
