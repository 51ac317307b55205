"""Do the feedback rules learn image classifiers? Accuracy curves of every rule, a small sweep of its settings,
against BP at its best learning rate and a "blocks frozen" line, on the embedded MNIST.

    OMP_NUM_THREADS=1 python benchmarks/vision_fidelity.py             # mlp, cnn, vit; 150 steps of batch 64
    python benchmarks/vision_fidelity.py --quick                       # 6 steps, the MLP, one run per rule: smoke test
    python benchmarks/vision_fidelity.py --models mlp --rules dfa grape  # a part of the grid
    python benchmarks/vision_fidelity.py --long                        # also 600 steps for each rule's best setting
    python benchmarks/vision_fidelity.py --report-only                 # table and figure from the cache

The scale is the target of issue 21: `run_image_classification.py --model mlp --dataset mnist --max_steps 150
--per_device_train_batch_size 64` with only `--rule` should reach 80 % with every rule (BP about 90 %). Every run
trains on the same stream of training images (seed 0, the Trainer's shuffling), from the same initial weights
(seed 0), with a constant learning rate (the example's 0.95-per-epoch decay does not act within 150 steps of
64 of 50,000 images), `max_grad_norm` 1 and no weight decay (the Trainer's defaults, as in the example) unless a
regime says otherwise, and is evaluated on the same 2,000 validation images (the first of the validation
split) at the same checkpoints. One seed: a difference under about 1.5 points (two standard errors of an
accuracy near 85 % on 2,000 images) is noise.

Models: `mlp` (3 x 1024 ReLU), `cnn` (LeNet-4), `vit` (`VIT_SMALL`: patches of 7, 3 layers of 64; built by
`grape_hf.models.build_image_model`). Rows per model:
- BP at Adam learning rates 1e-4 to 3e-3 (the best is BP in the figure);
- "frozen": only the output layer trains (every other parameter `requires_grad=False`), by BP, at lr 3e-4 to
  3e-3. The output layer receives the true error under every rule, so this is what any rule reaches when its
  hidden-layer updates do not help: a rule whose hidden updates help ends above it;
- every rule, a greedy sweep of its settings, one factor at a time (`SWEEPS`): the values of the first factor
  are run around the base, the best (`score`: mean accuracy at the last two checkpoints) is kept, then the next
  factor is swept around it. FA: learning rate; DFA, DRTP: learning rate, `block_lr_scale`; GrAPE: learning rate,
  `block_lr_scale`, `grape_lr`, `grape_smoothing`, `grape_alignment`, `grape_track_scale`; PEPITA: learning rate,
  `pepita_f_scale`. A learning-rate sweep whose best is its largest value goes on up (x3, to `MAX_LR`). All with
  Adam and the model unchanged (`feedback_init="normal"`: `identity` needs points as wide as the error). On the
  MLP and CNN the factors after the learning rate are swept again at the example's lr 1e-4 (`EXAMPLE_LR`): the
  library's table sets feedback fields, not the learning rate. PEPITA runs on the MLP only (it has no conv or
  attention version), FA on the MLP and CNN (it refuses a ViT's embeddings and norms);
- the published regimes (`PUBLISHED`), which change the model or the optimizer: DRTP (Frenkel et al. 2021):
  tanh hidden units, SGD with Nesterov momentum 0.9, lr 0.05; PEPITA (Srinivasan et al. 2023): one hidden layer,
  SGD momentum 0.9, lr 0.01, weight decay 1e-4, `pepita_f_scale` 0.05 (`benchmarks/reproduce_table1.py`,
  OWN_SETTINGS; at batch 64 here, where DRTP's used 100); and each regime's parts alone (`REGIME_PARTS`: the
  optimizer without the model change, the model change under Adam), to tell which part does the work;
- `EXTRA`: DFA, GrAPE and DRTP with the head at a high lr and the blocks slow (`HEAD_FAST`), where the frozen
  line learns best: a greedy sweep from block_lr_scale 1 never gets there.
Every run passes every feedback field of its rule explicitly (`FEEDBACK_DEFAULTS` plus the row's values), so
the results do not depend on the library's defaults.

Writes `<output_dir>/vision_fidelity.md` (a table per model: accuracy at each checkpoint, the best setting of each
rule marked), `vision_fidelity.json` (every run) and `vision_fidelity.png` (curves of the best setting of each
rule per model, with BP and the frozen line). Runs are cached in `--cache` (one JSON line per run, keyed by
its full configuration): a run already there is not run again, so an interrupted grid resumes.
Run with `OMP_NUM_THREADS=1` on a shared machine: the grid runs sequentially in one process.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from transformers import PrinterCallback, set_seed

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.data.images import load_image_dataset
from grape_hf.models import build_image_model

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------

SHAPES = {
    # steps, batch, evaluation checkpoints, validation images
    "default": dict(steps=150, batch=64, eval_every=25, eval_images=2000),
    "long": dict(steps=600, batch=64, eval_every=100, eval_images=2000),
    "quick": dict(steps=6, batch=64, eval_every=3, eval_images=256),
}

# A ViT small enough for a run of seconds on one core: 16 patches of 7x7, 3 pre-LN layers of 64 (4 heads, MLP 256).
VIT_SMALL = dict(patch_size=7, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MODELS = {"mlp": {}, "cnn": {}, "vit": VIT_SMALL}
MODEL_LABELS = {"mlp": "MLP 3 x 1024 ReLU", "cnn": "CNN (LeNet-4)", "vit": "ViT (patch 7, 3 x 64)"}
RULES = ("bp", "fa", "dfa", "grape", "drtp", "pepita")
# The models a rule has a version for: FA replaces W^T in nn.Linear and nn.Conv2d only (a ViT has embeddings and
# norms with weights: FA refuses it), PEPITA needs a multilayer perceptron.
RULE_MODELS = {"fa": ("mlp", "cnn"), "pepita": ("mlp",)}

# Every feedback field a rule reads, at the value each run starts from (the values of the library before issue
# 21, whose defaults become "unset"). A run passes the fields that apply to its rule (the field's metadata).
FEEDBACK_DEFAULTS = dict(
    feedback_init="normal", feedback_seed=0, setting="macro", feedback_embeddings=True, error_point="logits", block_lr_scale=1.0, grape_lr=1e-3,
    grape_smoothing="none", grape_ema_decay=0.9, grape_track_scale=False, grape_alignment="frobenius",
    grape_update_steps=1, bp_calibration_steps=0, pepita_f_scale=0.05, pepita_mirror_lr=0.0,
    pepita_mirror_weight_decay=1e-4, pepita_mirror_noise=0.1,
)
# The optimizer and model of every sweep run: Adam (AdamW, no weight decay), constant lr, the model as built.
ADAM = dict(optim="adamw_torch", optim_args=None, weight_decay=0.0, config={})

LRS = [1e-4, 3e-4, 1e-3, 3e-3]
# rule -> the factors swept one at a time, in order: (field, values); the first value of each is the base.
SWEEPS = {
    "bp": [("learning_rate", LRS)],
    "fa": [("learning_rate", LRS)],
    "dfa": [("learning_rate", LRS), ("block_lr_scale", [1.0, 0.3, 0.1, 0.03])],
    "grape": [("learning_rate", LRS), ("block_lr_scale", [1.0, 0.3, 0.1, 0.03]), ("grape_lr", [1e-2, 1e-3, 1e-1]),
              ("grape_smoothing", ["none", "ema"]), ("grape_alignment", ["frobenius", "columns"]),
              ("grape_track_scale", [False, True])],
    # DRTP's blocks learn from the projected target, not the error: their rate may want to go up as well as down.
    "drtp": [("learning_rate", LRS), ("block_lr_scale", [1.0, 0.3, 3.0])],
    "pepita": [("learning_rate", LRS), ("pepita_f_scale", [0.05, 0.02, 0.2])],
}
# The example's learning rate (run_image_classification.py: 1e-4, the GrAPE paper's): the table sets feedback fields,
# not the learning rate, so on these models each rule's other factors are also swept with the lr held here.
EXAMPLE_LR = 1e-4
EXAMPLE_LR_MODELS = ("mlp", "cnn")
FROZEN_LRS = [3e-4, 1e-3, 3e-3]  # a linear read-out learns best at a higher lr than the whole network
MAX_LR = 0.3  # the lr sweeps go on up (x3) while the best is the largest tried, up to this
# Single runs beside the sweep (Adam, model unchanged): the head at the high lr where the frozen line learns best, the
# blocks slow (`block_lr_scale`), which a greedy sweep from block_lr_scale 1 cannot reach (at a high lr with the
# blocks at full rate, every rule diverges). GrAPE with the feedback settings that win on the MLP and CNN.
HEAD_FAST = [dict(learning_rate=lr, block_lr_scale=scale) for lr, scale in ((1e-2, 0.1), (1e-2, 0.03), (3e-2, 0.03),
                                                                            (3e-2, 0.01))]
EXTRA = {"dfa": HEAD_FAST,
         "grape": [dict(run, grape_lr=0.1, grape_smoothing="ema") for run in HEAD_FAST],
         "drtp": [dict(learning_rate=3e-3, block_lr_scale=0.03)] + HEAD_FAST}

# The published regimes: (description, the run's fields). They change the optimizer and, DRTP, the units, PEPITA,
# the depth: not settings a table can set on a model the user built.
PUBLISHED = {
    "drtp": ("published: tanh units, SGD Nesterov 0.9, lr 0.05",
             dict(config={"hidden_act": "tanh"}, optim="sgd", optim_args="momentum=0.9,nesterov=True",
                  learning_rate=0.05, weight_decay=0.0)),
    "pepita": ("published: 1 hidden layer, SGD momentum 0.9, lr 0.01, wd 1e-4, F scale 0.05",
               dict(config={"num_hidden_layers": 1}, optim="sgd", optim_args="momentum=0.9", learning_rate=0.01,
                    weight_decay=1e-4, pepita_f_scale=0.05)),
}
# Each published regime's parts one at a time, to tell which part does the work (the model change or the optimizer).
REGIME_PARTS = {
    "drtp": [("SGD Nesterov 0.9, lr 0.05 alone (ReLU units)",
              dict(optim="sgd", optim_args="momentum=0.9,nesterov=True", learning_rate=0.05, weight_decay=0.0)),
             ("tanh units alone (Adam lr 1e-4)", dict(config={"hidden_act": "tanh"}, learning_rate=1e-4))],
    "pepita": [("SGD momentum 0.9, lr 0.01, wd 1e-4 alone (3 hidden layers)",
                dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.01, weight_decay=1e-4)),
               ("1 hidden layer alone (Adam lr 1e-4)", dict(config={"num_hidden_layers": 1}, learning_rate=1e-4))],
}


def rule_fields(rule: str) -> list[str]:
    """The `FEEDBACK_DEFAULTS` fields that `rule` reads (each field's metadata names its rules)."""
    fields = GrapeTrainingArguments.__dataclass_fields__
    return [name for name in FEEDBACK_DEFAULTS if rule in fields[name].metadata["rules"]]


def make_spec(model: str, rule: str, **values) -> dict:
    """A run: model, rule, optimizer, config overrides, learning rate, and every feedback field of the rule."""
    spec = dict(model=model, rule=rule, frozen=values.pop("frozen", False), **ADAM, learning_rate=1e-4)
    spec.update({name: FEEDBACK_DEFAULTS[name] for name in rule_fields(rule)})
    unknown = set(values) - set(spec)
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not fields of a {rule} run (its fields: {sorted(spec)}).")
    spec.update(values)
    return spec


def key(spec: dict, shape: dict) -> str:
    """The cache key: the whole configuration, so a changed grid never reads a stale result."""
    return json.dumps({**spec, "steps": shape["steps"], "batch": shape["batch"], "eval_every": shape["eval_every"],
                       "eval_images": shape["eval_images"], "vit": VIT_SMALL if spec["model"] == "vit" else None},
                      sort_keys=True)


# ----------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------

def train_one(spec: dict, shape: dict, data, output_dir: str) -> dict:
    """Train `spec` for `shape["steps"]` steps; its validation accuracy at every checkpoint."""
    set_seed(0)  # the same initial weights for every run of a model
    channels, size, _ = data.image_shape
    model = build_image_model(spec["model"], num_labels=data.num_labels, num_channels=channels, image_size=size,
                              **{**MODELS[spec["model"]], **spec["config"]})
    if spec["frozen"]:
        # Only the output layer learns: every other parameter is fixed at its initial value.
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("classifier.")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{spec['model']} has no parameter named classifier.*: the frozen line would train nothing.")
    feedback = {name: spec[name] for name in rule_fields(spec["rule"])}
    args = GrapeTrainingArguments(
        output_dir=output_dir, seed=0, rule=spec["rule"], max_steps=shape["steps"],
        per_device_train_batch_size=shape["batch"], per_device_eval_batch_size=500,
        learning_rate=spec["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        optim=spec["optim"], optim_args=spec["optim_args"], weight_decay=spec["weight_decay"],
        eval_strategy="steps", eval_steps=shape["eval_every"], logging_steps=shape["eval_every"],
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        **feedback)

    def accuracy(prediction) -> dict:
        return {"accuracy": float(np.mean(prediction.predictions == prediction.label_ids))}

    trainer = GrapeTrainer(model=model, args=args, train_dataset=data.splits["train"],
                           eval_dataset=data.splits["validation"].select(range(shape["eval_images"])),
                           data_collator=data.collator, compute_metrics=accuracy,
                           preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1))
    trainer.remove_callback(PrinterCallback)  # one line per run instead of every log dict
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    if trainer.feedback is not None:
        trainer.feedback.remove()
    evals = [(e["step"], round(100 * e["eval_accuracy"], 2)) for e in trainer.state.log_history if "eval_accuracy" in e]
    losses = [(e["step"], round(e["loss"], 4)) for e in trainer.state.log_history if "loss" in e]
    return dict(evals=evals, train_loss=losses, seconds=round(seconds, 1))


class Grid:
    """Runs specs through the cache: a spec already there is read, not run."""

    def __init__(self, shape: dict, data, cache: str, output_dir: str, report_only: bool):
        self.shape, self.data, self.cache, self.output_dir, self.report_only = shape, data, cache, output_dir, report_only
        self.done = {}
        if os.path.exists(cache):
            with open(cache) as f:
                for line in f:
                    record = json.loads(line)
                    self.done[record["key"]] = record

    def run(self, label: str, spec: dict) -> dict | None:
        k = key(spec, self.shape)
        if k not in self.done:
            if self.report_only:
                return None
            # The Trainer's output_dir (GrAPE's alignment.png lands there): scratch, not the results folder.
            result = train_one(spec, self.shape, self.data, os.path.join(tempfile.gettempdir(), "vision_fidelity_runs"))
            record = dict(key=k, spec=spec, shape=self.shape, **result)
            with open(self.cache, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.done[k] = record
            print(f"{spec['model']:4s} {label:60s} {[a for _, a in result['evals']]} ({result['seconds']:.0f}s)",
                  flush=True)
        return self.done[k]


def final(record: dict) -> float:
    """The accuracy at the last checkpoint."""
    return record["evals"][-1][1]


def score(record: dict) -> float:
    """What "best" means: the mean accuracy at the last two checkpoints (one alone moves by a few points from one
    checkpoint to the next)."""
    return sum(a for _, a in record["evals"][-2:]) / len(record["evals"][-2:])


def describe(spec: dict, base: dict) -> str:
    """The fields where `spec` differs from `base`, e.g. 'lr 3e-4, block_lr_scale 0.3'."""
    parts = []
    for name, value in spec.items():
        if name in ("model", "rule", "frozen") or base.get(name) == value:
            continue
        parts.append(f"lr {value:g}" if name == "learning_rate" else f"{name} {value}")
    return ", ".join(parts) or "base"


def sweep(grid: Grid, model: str, rule: str, fixed: dict | None = None, frozen: bool = False) -> list[tuple[str, dict]]:
    """The greedy one-factor-at-a-time sweep of `rule` on `model` (`frozen`: the output layer only, over
    `FROZEN_LRS`), with the fields of `fixed` held: (settings, spec) of every run, in order. Where the best learning
    rate is the largest tried, 3x that is tried too (up to `MAX_LR`)."""
    fixed = fixed or {}
    factors = [("learning_rate", FROZEN_LRS)] if frozen else SWEEPS[rule]
    best = make_spec(model, rule, frozen=frozen, **{**{name: values[0] for name, values in factors}, **fixed})
    base = make_spec(model, rule)  # the labels name what differs from FEEDBACK_DEFAULTS
    runs = []
    for name, values in factors:
        if name in fixed:
            continue
        results = []
        values = list(values)
        for value in values:
            spec = {**best, name: value}
            settings = describe(spec, {k: v for k, v in base.items() if k != "learning_rate"})
            record = grid.run(f"{'frozen' if frozen else rule} {settings}", spec)
            if all(s != spec for _, s in runs):
                runs.append((settings, spec))
            if record is not None:
                results.append((score(record), spec))
                top = max(results, key=lambda r: r[0])[1]
                if name == "learning_rate" and value == values[-1] and top is spec:
                    up = float(f"{value * 3.2:.0e}")  # 3e-3 -> 1e-2 -> 3e-2
                    if up <= MAX_LR:
                        values.append(up)  # the best is at the edge: go on up
        if results:
            best = max(results, key=lambda r: r[0])[1]
    return runs


def plan(grid: Grid, models: list[str], rules: list[str], quick: bool) -> dict:
    """Run (or read) the grid; model -> rows [(settings, spec)] in table order."""
    rows = {}
    for model in models:
        rows[model] = []
        for rule in rules:
            if model not in RULE_MODELS.get(rule, MODELS):
                continue
            if quick:  # one run per rule (and published regime): the pipeline, not the numbers
                spec = make_spec(model, rule, learning_rate=1e-3)
                grid.run(f"{rule} lr 0.001", spec)
                rows[model].append(("lr 0.001", spec))
            else:
                rows[model] += sweep(grid, model, rule)
                if model in EXAMPLE_LR_MODELS and rule != "bp":
                    runs = sweep(grid, model, rule, fixed=dict(learning_rate=EXAMPLE_LR))
                    rows[model] += [run for run in runs if all(run[1] != spec for _, spec in rows[model])]
            for values in [] if quick else EXTRA.get(rule, []):
                spec = make_spec(model, rule, **values)
                settings = describe(spec, {k: v for k, v in make_spec(model, rule).items() if k != "learning_rate"})
                grid.run(f"{rule} {settings}", spec)
                if all(spec != other for _, other in rows[model]):
                    rows[model].append((settings, spec))
            if rule in PUBLISHED:
                for settings, values in [PUBLISHED[rule], *([] if quick else REGIME_PARTS.get(rule, []))]:
                    spec = make_spec(model, rule, **values)
                    grid.run(f"{rule} {settings}", spec)
                    rows[model].append((settings, spec))
        if quick:
            spec = make_spec(model, "bp", frozen=True, learning_rate=1e-3)
            grid.run("frozen lr 0.001", spec)
            rows[model].append(("output layer only, lr 0.001", spec))
        else:
            rows[model] += [(f"output layer only, {settings}", spec)
                            for settings, spec in sweep(grid, model, "bp", frozen=True)]
    return rows


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def is_published(spec: dict) -> bool:
    """Whether the run changes the optimizer or the model: a published regime or a part of one."""
    return spec["optim"] != "adamw_torch" or bool(spec["config"])


def regime_group(spec: dict) -> str:
    """'<rule> published' for the published regime itself, '<rule> regime parts' for a part of it."""
    published = make_spec(spec["model"], spec["rule"], **PUBLISHED[spec["rule"]][1]) if spec["rule"] in PUBLISHED else None
    return spec["rule"] + (" published" if spec == published else " regime parts")


def groups(spec: dict) -> list[str]:
    """The row groups a run may be best of: its rule (Adam, model unchanged), its published regime, or frozen;
    and its rule at the example's learning rate (Adam, model unchanged, lr `EXAMPLE_LR`)."""
    if spec["frozen"]:
        return ["frozen"]
    if is_published(spec):
        return [regime_group(spec)]
    at_example_lr = (spec["rule"] != "bp" and spec["learning_rate"] == EXAMPLE_LR
                     and spec["model"] in EXAMPLE_LR_MODELS)
    return [spec["rule"]] + ([f"{spec['rule']} at lr {EXAMPLE_LR:g}"] if at_example_lr else [])


def bests(rows: list[tuple[str, dict]], grid: Grid) -> dict[str, tuple[str, dict, dict, tuple | None]]:
    """group -> (label, spec, record, runner-up (label, spec, record) or None) by `score`."""
    by_group = {}
    for label, spec in rows:
        record = grid.done.get(key(spec, grid.shape))
        if record is not None:
            for g in groups(spec):
                by_group.setdefault(g, []).append((label, spec, record))
    out = {}
    for g, runs in by_group.items():
        ranked = sorted(runs, key=lambda r: -score(r[2]))  # stable: the earlier run wins a tie
        out[g] = (*ranked[0], ranked[1] if len(ranked) > 1 else None)
    return out


def report(grid: Grid, rows: dict, output_dir: str, name: str, command: str) -> str:
    """Write `<name>.md`, `.json` and `.png` in `output_dir`; the markdown text."""
    lines = [f"# Vision fidelity: {grid.shape['steps']} steps of batch {grid.shape['batch']} on the embedded MNIST",
             "",
             f"Generated by `OMP_NUM_THREADS=1 python benchmarks/vision_fidelity.py{command}` "
             f"(seed 0, one seed; validation accuracy in % on the first {grid.shape['eval_images']} validation "
             "images; one core). Sweep runs: Adam (AdamW, no weight decay), constant lr, `max_grad_norm` 1, "
             "the model as built; every feedback field passed explicitly, at the values below unless the row "
             "names another: " + ", ".join(f"`{k}`={v!r}" for k, v in FEEDBACK_DEFAULTS.items()) + ". "
             "**bold**: the best setting of its rule (and of its published regime), by score, the mean accuracy at "
             f"the last two checkpoints; †: the best at the example's learning rate ({EXAMPLE_LR:g}, "
             "run_image_classification.py's; the MLP and CNN also have the other factors swept at it, rows after the "
             "rule's first sweep). The frozen line trains the "
             "output layer only (by BP: it gets the true error under every rule). The sweep is greedy, one factor "
             "at a time in the order the rows are listed; the rows with a high lr and a small `block_lr_scale` "
             "after it are `HEAD_FAST` (the head where the frozen line learns best, the blocks slow), then the "
             "published regime and its parts alone. A gap under about 1.5 points is noise (one seed, "
             f"{grid.shape['eval_images']} images). `s`: wall seconds on a shared machine, not a timing.", ""]
    summary = {}
    for model, model_rows in rows.items():
        best = bests(model_rows, grid)
        summary[model] = best
        done = [(label, spec) for label, spec in model_rows if key(spec, grid.shape) in grid.done]
        if not done:
            continue
        steps = [s for s, _ in grid.done[key(done[0][1], grid.shape)]["evals"]]
        lines += [f"## {MODEL_LABELS[model]}", ""]
        header = "| rule | settings | " + " | ".join(f"@{s}" for s in steps) + " | score | s |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for settings, spec in done:
            record = grid.done[key(spec, grid.shape)]
            primary, *others = groups(spec)
            marked = best.get(primary, (None, None))[1] is spec
            dagger = any(best.get(g, (None, None))[1] is spec for g in others)
            accs = [f"{a:.1f}" for _, a in record["evals"]]
            if marked:
                accs[-1] = f"**{accs[-1]}**"
            if dagger:
                accs[-1] += " †"
            rule = "frozen" if spec["frozen"] else spec["rule"]
            lines.append(f"| {'**' + rule + '**' if marked else rule} | {settings} | " + " | ".join(accs) +
                         f" | {score(record):.1f} | {record['seconds']:.0f} |")
        lines.append("")
        lines.append("Best per rule (by score; runner-up in brackets); does it reach 80 % at the last checkpoint?")
        for g, (label, spec, record, runner) in best.items():
            up = f" (runner-up: {runner[0]}, {final(runner[2]):.1f}, score {score(runner[2]):.1f})" if runner else ""
            fields = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k not in ("model", "rule"))
            lines.append(f"- {g}: {label}, {final(record):.1f} % at step {record['evals'][-1][0]}, score "
                         f"{score(record):.1f} (80 % reached: {'yes' if final(record) >= 80 else 'NO'})"
                         f"{up}; every field: {fields}")
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    dump = {model: dict(
        best={g: dict(label=label, spec=spec, accuracy=final(record), score=score(record),
                      runner_up=dict(label=runner[0], spec=runner[1], accuracy=final(runner[2]),
                                     score=score(runner[2])) if runner else None)
              for g, (label, spec, record, runner) in summary[model].items()},
        runs=[dict(label=label, **{k: v for k, v in grid.done[key(spec, grid.shape)].items() if k != "key"})
              for label, spec in rows[model] if key(spec, grid.shape) in grid.done])
        for model in rows}
    with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
        json.dump(dict(shape=grid.shape, feedback_defaults=FEEDBACK_DEFAULTS, vit=VIT_SMALL, models=dump), f, indent=1)
    plot(summary, grid, os.path.join(output_dir, f"{name}.png"))
    return text


COLORS = {"bp": "k", "fa": "tab:blue", "dfa": "tab:orange", "grape": "tab:green", "drtp": "tab:red",
          "pepita": "tab:purple", "frozen": "0.5"}


def plot(summary: dict, grid: Grid, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = [m for m in summary if summary[m]]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models), 5.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for g, (label, spec, record, _) in summary[model].items():
            if g.endswith(f" at lr {EXAMPLE_LR:g}") or g.endswith(" regime parts"):
                continue  # the figure: each rule's best (Adam, any lr), its published regime, BP and frozen
            rule = "frozen" if g == "frozen" else spec["rule"]
            style = "--" if g.endswith("published") else ":" if g == "frozen" else "-"
            name = ("frozen: output layer only" if g == "frozen" else "BP" if rule == "bp" else
                    f"{rule}, published regime" if g.endswith("published") else f"{rule}, Adam")
            ax.plot(*zip(*record["evals"]), style, color=COLORS[rule], marker=".",
                    label=f"{name}: {final(record):.1f}", lw=2 if rule == "bp" else 1.4)
        ax.axhline(80, color="0.8", lw=0.8, zorder=0)
        ax.set_ylim(0, 100)
        ax.set_title(f"{MODEL_LABELS[model]}: best setting per rule", fontsize=10)
        ax.set_xlabel(f"step (batch {grid.shape['batch']})"), ax.set_ylabel("validation accuracy (%)")
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A smoke test: a few steps, the MLP, bp/dfa/pepita.")
    parser.add_argument("--long", action="store_true",
                        help="After the grid, run each rule's best setting for 600 steps (vision_fidelity_long.*).")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--output_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--cache", default=None,
                        help="JSON-lines cache of runs (default: /tmp/vision_fidelity_cache[_quick].jsonl).")
    parser.add_argument("--report-only", action="store_true", help="Table and figure from the cache; run nothing.")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = a.models or (["mlp"] if a.quick else list(MODELS))
    output_dir = a.output_dir if not a.quick else os.path.join("/tmp", "vision_fidelity_quick")
    os.makedirs(output_dir, exist_ok=True)
    cache = a.cache or f"/tmp/vision_fidelity_cache{'_quick' if a.quick else ''}.jsonl"
    data = load_image_dataset("mnist")
    print(f"{data.description}; cache {cache}; output {output_dir}", flush=True)
    grid = Grid(SHAPES["quick" if a.quick else "default"], data, cache, output_dir, a.report_only)
    rows = plan(grid, models, a.rules, a.quick)
    print(report(grid, rows, output_dir, "vision_fidelity", " --quick" if a.quick else ""))
    if a.long and not a.quick:
        # Each rule's best setting (Adam, model unchanged), its published regime, BP's and the frozen line's best
        # again, for 600 steps.
        long_grid = Grid(SHAPES["long"], data, cache, output_dir, a.report_only)
        long_rows = {}
        for model in models:
            long_rows[model] = []
            for g, (settings, spec, _, _) in bests(rows[model], grid).items():
                if g.endswith(" regime parts") or g.endswith(f" at lr {EXAMPLE_LR:g}"):
                    continue  # the long line: each rule's best, its published regime, BP and the frozen line
                if all(spec is not other for _, other in long_rows[model]):
                    long_grid.run(f"{spec['rule']} {settings}", spec)
                    long_rows[model].append((settings, spec))
        print(report(long_grid, long_rows, output_dir, "vision_fidelity_long", " --long"))

if __name__ == "__main__":
    sys.exit(main())
