"""Step time and activation memory of BP, DFA and GrAPE, side by side on the same model and batch.

    python benchmarks/step_time.py                      # GPT-2 (4 x 256, seq 128, batch 8) and a ViT, CPU-sized
    python benchmarks/step_time.py --model gpt2 --n_layer 6 --d_model 512 --batch 16 --rounds 5
    OMP_NUM_THREADS=1 python benchmarks/step_time.py --critical_path   # DFA's backward as independent segments
    python benchmarks/step_time.py --parallel_backward 2                 # ... run on 2 threads, in wall time

Each step is `GrapeTrainer.training_step` (forward, the rule's work, the one backward) plus the
optimizer step, i.e. what training costs; with `--trainer_loop`, each step of `GrapeTrainer.train()` itself
(data loader, callbacks and all), timed by a callback from step begin to step end. Variants: BP, DFA,
GrAPE, GrAPE estimating every 4th step, GrAPE estimating on every 4th and every 8th row
(`grape_estimate_stride`), and on the GPT-2 also DFA with identity feedback (examples/run_wikitext.py's
DFA, no projection matmul). The
variants run in rounds of blocks of steps, so drift of the machine hits all alike; the table gives median
and mean step time, the mean CPU time of the process per step, and peak memory, with ratios to BP, and
each round's CPU ratio to BP's round (median and range: how much the machine swings; `--block 1 --warmup 0`
alternates the variants at every step). On a shared machine the wall-time ratios
move with the other jobs; with one thread (`OMP_NUM_THREADS=1`) the CPU-time ratio moves less (memory
contention still shows in it), so it is the figure to compare across runs (with several threads it also
counts their spin-waits).
Critical path (`--critical_path`): once `e` is known, DFA's segments are independent, so their local
backwards could run in parallel (one CUDA stream each). On one forward of the DFA model, it times the
whole backward (sequential, as today), the part above the tap alone (loss, head, the tap: the
`TAP` source of `Rule.isolating`) and each point's backward alone (`Rule.isolating(point)`: the head
part, the projection `B_k e` and that segment), next to BP's backward on the same model and batch.
The ideal parallel backward is the head part plus the slowest segment (its projection included).
`--parallel_backward N` runs it: the backward's wall time with the segments on N threads
(`GrapeTrainingArguments.parallel_backward`), against BP and DFA's one backward on N intra-op threads.
Memory: on CUDA the allocator's peak; on CPU the bytes of the tensors saved for backward that are
still alive when the forward ends (the activations, where the rules differ; weights and optimizer
state are the same for all), measured in a separate untimed forward.
"""

import argparse
import contextlib
import statistics
import tempfile
import time
import weakref

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from grape_hf import GrapeTrainer, GrapeTrainingArguments
from grape_hf.direct.network import TAP

VARIANTS = {  # name -> GrapeTrainingArguments overrides
    "bp": dict(rule="bp"),
    "dfa": dict(rule="dfa"),
    # The estimate in the training forward, on the whole batch (on a causal LM the library's table estimates on
    # every 8th row: "grape rows/8").
    "grape": dict(rule="grape", grape_estimate_stride=1),
    "grape/4": dict(rule="grape", grape_update_steps=4, grape_smoothing="ema", grape_estimate_stride=1),
    # The estimate on every 4th / 8th row, in a forward of its own without autograd, stopped at the error tap.
    "grape rows/4": dict(rule="grape", grape_estimate_stride=4),
    "grape rows/8": dict(rule="grape", grape_estimate_stride=8),
}
# Language models only (their error is read on the residual stream, as wide as the points): DFA as
# examples/run_wikitext.py runs it, with the skip path's Jacobian, I, as feedback (no projection matmul).
LM_VARIANTS = {"dfa (identity)": dict(rule="dfa", feedback_init="identity")}


def build(flags):
    """A fresh model and one batch, per `flags.model`."""
    torch.manual_seed(0)
    if flags.model == "gpt2":
        config = GPT2Config(n_layer=flags.n_layer, n_embd=flags.d_model, n_head=flags.n_head, n_inner=4 * flags.d_model,
                            vocab_size=flags.vocab, n_positions=flags.seq)
        ids = torch.randint(0, flags.vocab, (flags.batch, flags.seq))
        return GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}
    config = ViTConfig(num_hidden_layers=flags.n_layer, hidden_size=flags.d_model, num_attention_heads=flags.n_head,
                       intermediate_size=4 * flags.d_model, image_size=32, patch_size=4, num_labels=10)
    return ViTForImageClassification(config), {"pixel_values": torch.randn(flags.batch, 3, 32, 32),
                                               "labels": torch.randint(0, 10, (flags.batch,))}


class LiveSavedBytes:
    """Bytes of the tensors saved for backward that are still alive when the forward ends: the
    activation memory a step holds into its backward (CPU memory proxy)."""

    def __init__(self):
        self.saved: dict[int, tuple[list[weakref.ref], int]] = {}  # storage -> (its saved tensors, bytes)

    def pack(self, tensor):
        try:
            key, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        except RuntimeError:  # a forward-AD (dual) wrapper has no storage of its own: count its elements
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        refs, _ = self.saved.setdefault(key, ([], size))
        refs.append(weakref.ref(tensor))
        return tensor

    def live(self) -> int:
        """Bytes of the storages that some saved tensor still holds."""
        return sum(size for refs, size in self.saved.values() if any(ref() is not None for ref in refs))


def forward_memory(trainer, batch) -> int:
    """`LiveSavedBytes` of one training forward (the rule's work included), without its backward."""
    saved = LiveSavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, batch)
    live = saved.live()
    del loss
    return live


def make_trainer(flags, overrides, output_dir):
    model, batch = build(flags)
    args = GrapeTrainingArguments(output_dir=output_dir, report_to="none", setting=flags.setting,
                                  use_cpu=flags.device == "cpu", save_strategy="no", disable_tqdm=True,
                                  per_device_train_batch_size=flags.batch, **overrides)
    trainer = GrapeTrainer(model=model, args=args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`, read by `training_step`
    return trainer, trainer._prepare_inputs(batch)


class StepClock(TrainerCallback):
    """Wall and CPU seconds of every optimizer step of `Trainer.train()`, from `on_step_begin` to `on_step_end`."""

    def __init__(self):
        self.wall, self.cpu, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def trained_steps(trainer, batch, steps: int) -> StepClock:
    """`steps` optimizer steps of `trainer.train()` (the full Trainer loop: data loader, callbacks, the rule, the
    optimizer) on the rows of `batch`, timed by a `StepClock`."""
    rows = next(iter(batch.values())).shape[0]
    trainer.train_dataset = [{key: value[i].cpu() for key, value in batch.items()} for i in range(rows)] * steps
    trainer.args.max_steps = steps  # read by train(); the batch size was set at construction
    clock = StepClock()
    trainer.add_callback(clock)
    try:
        trainer.train()
    finally:
        trainer.remove_callback(clock)
    return clock


def step(trainer, batch):
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    trainer.state.global_step += 1


def run(flags):
    device = torch.device(flags.device)
    trainers = {}
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in (VARIANTS | (LM_VARIANTS if flags.model == "gpt2" else {})).items():
            trainers[name] = make_trainer(flags, overrides, out)
        times = {name: [] for name in trainers}
        cpu = {name: [] for name in trainers}
        memory = {}
        # Rounds of blocks: each variant runs `warmup` unmeasured steps, then `block` measured ones.
        # Blocks rather than single interleaved steps: switching model at every step makes each
        # step pay for the previous variant's allocations, which no real run does.
        for _ in range(flags.rounds):
            for name, (trainer, batch) in trainers.items():
                if flags.trainer_loop:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    clock = trained_steps(trainer, batch, flags.warmup + flags.block)
                    if device.type == "cuda":
                        memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated())
                    times[name] += clock.wall[flags.warmup:]
                    cpu[name] += clock.cpu[flags.warmup:]
                    continue
                for i in range(flags.warmup + flags.block):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    step(trainer, batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                        memory[name] = max(memory.get(name, 0), torch.cuda.max_memory_allocated())
                    if i >= flags.warmup:
                        times[name].append(time.perf_counter() - start)
                        cpu[name].append(time.process_time() - start_cpu)
        if device.type != "cuda":  # untimed: the hook costs a Python call per saved tensor
            for name, (trainer, batch) in trainers.items():
                trainer.state.global_step = 0  # an estimating step for the GrAPE variants
                memory[name] = forward_memory(trainer, batch)
    bp_time, bp_memory = statistics.median(times["bp"]), memory["bp"]
    unit = "peak allocated" if device.type == "cuda" else "activations held for backward"
    print(f"\n{flags.model} ({flags.setting}, {flags.n_layer} x {flags.d_model}, batch {flags.batch}"
          f"{f', seq {flags.seq}' if flags.model == 'gpt2' else ''}, {device}, {flags.rounds} x {flags.block} steps, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads)")
    # The mean too: 'grape/4' estimates on one step in four, which the median alone would hide.
    # The last ratio pairs each round's block with BP's block of the same round: drift of the machine between
    # rounds (other jobs) cancels, which it does not in the ratio of the means over all rounds.
    print(f"| variant | median step (s) | x BP | mean step (s) | x BP | mean CPU (s) | x BP | {unit} (MB) | x BP | "
          "CPU x BP, median of rounds (min-max) |\n|---|---|---|---|---|---|---|---|---|---|")
    bp_mean, bp_cpu = statistics.mean(times["bp"]), statistics.mean(cpu["bp"])
    for name in trainers:
        median, mean, used = statistics.median(times[name]), statistics.mean(times[name]), statistics.mean(cpu[name])
        rounds = [statistics.mean(cpu[name][i:i + flags.block]) / statistics.mean(cpu["bp"][i:i + flags.block])
                  for i in range(0, len(cpu[name]), flags.block)]  # each round's block against BP's
        print(f"| {name} | {median:.4f} | {median / bp_time:.2f} | {mean:.4f} | {mean / bp_mean:.2f} | {used:.4f} | "
              f"{used / bp_cpu:.2f} | {memory[name] / 2**20:.1f} | {memory[name] / bp_memory:.2f} | "
              f"{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f}) |")


def timed_backward(loss: torch.Tensor, context, repeats: int) -> float:
    """Median CPU seconds of the process for `loss.backward(retain_graph=True)` inside `context()`, over
    `repeats` runs (CPU time: with one thread it holds when other jobs share the machine)."""
    times = []
    for _ in range(repeats):
        with context():
            start = time.process_time()
            loss.backward(retain_graph=True)
            times.append(time.process_time() - start)
    return statistics.median(times)


def critical_path(flags) -> None:
    """Print BP's backward, DFA's sequential backward and its ideal parallel one (see the module docstring)."""
    repeats = max(3, flags.rounds * flags.block)
    with tempfile.TemporaryDirectory() as out:
        trainer, batch = make_trainer(flags, dict(rule="dfa"), out)
        rule, model = trainer.feedback, trainer.model
        model.train()
        with rule.bp_step():  # the same model and batch, its hooks idle
            bp_loss = model(**batch).loss
        bp = timed_backward(bp_loss, rule.bp_step, repeats)
        del bp_loss
        loss = trainer.compute_loss(model, batch)
        whole = timed_backward(loss, contextlib.nullcontext, repeats)
        head = timed_backward(loss, lambda: rule.isolating(TAP), repeats)
        segments = {name: timed_backward(loss, lambda name=name: rule.isolating(name), repeats) - head
                    for name in rule.point_names}
        model.zero_grad(set_to_none=True)
    slowest = max(segments, key=segments.get)
    ideal = head + segments[slowest]
    print(f"\n{flags.model} DFA {flags.setting} backward, {len(segments)} segments ({repeats} runs each, median): "
          f"BP {bp * 1e3:.1f} ms; DFA sequential {whole * 1e3:.1f} ms ({whole / bp:.2f} x BP); above the tap "
          f"{head * 1e3:.1f} ms; slowest segment {slowest} {segments[slowest] * 1e3:.1f} ms; ideal parallel "
          f"{ideal * 1e3:.1f} ms ({ideal / bp:.2f} x BP, {ideal / whole:.2f} x DFA sequential)")
    print("| segment | " + " | ".join(segments) + " |")
    print("|---" * (len(segments) + 1) + "|")
    print("| ms | " + " | ".join(f"{t * 1e3:.1f}" for t in segments.values()) + " |")


def wall_backward(trainer, batch, threads: int, repeats: int) -> list[float]:
    """Wall seconds of `loss.backward()` after each of `repeats` fresh training forwards (the segment threads
    free each segment's graph as they go, so a graph cannot be timed twice), with `threads` intra-op threads."""
    torch.set_num_threads(threads)
    times = []
    for _ in range(repeats):
        loss = trainer.compute_loss(trainer.model, batch)
        start = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - start)
        trainer.model.zero_grad(set_to_none=True)
    return times


def parallel_backward(flags) -> None:
    """BP's and DFA's backward in wall time on `flags.parallel_backward` cores: BP and DFA's one backward with
    that many intra-op threads (and with one), against DFA with `parallel_backward` segment threads of one
    intra-op thread each; in rounds, so that other jobs on the machine hit all alike."""
    cores = flags.parallel_backward
    variants = {  # name -> (trainer overrides, intra-op threads)
        "BP, 1 thread": (dict(rule="bp"), 1),
        f"BP, {cores} threads": (dict(rule="bp"), cores),
        "DFA one backward, 1 thread": (dict(rule="dfa"), 1),
        f"DFA one backward, {cores} threads": (dict(rule="dfa"), cores),
        f"DFA parallel_backward={cores}": (dict(rule="dfa", parallel_backward=cores), cores),
    }
    times = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as out:
        trainers = {name: make_trainer(flags, overrides, out) for name, (overrides, _) in variants.items()}
        for trainer, _ in trainers.values():
            trainer.model.train()
        for _ in range(flags.rounds):
            for name, (_, threads) in variants.items():
                wall_backward(*trainers[name], threads, 1)  # warm-up
                times[name] += wall_backward(*trainers[name], threads, flags.block)
        for trainer, _ in trainers.values():
            if trainer.feedback is not None:
                trainer.feedback.remove()  # stops the segment threads
    reference = statistics.median(times[f"BP, {cores} threads"])
    print(f"\n{flags.model} {flags.setting} backward, wall time on {cores} cores ({flags.rounds} x {flags.block} "
          f"backwards each, median; x BP on {cores} threads)")
    print("| backward | median (ms) | x BP |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {median / reference:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "vit", "both"], default="both")
    parser.add_argument("--setting", choices=["macro", "micro"], default="macro")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--block", type=int, default=4, help="measured steps per variant and round (a multiple of 4, "
                                                             "so grape/4 estimates on one step in four)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before each block")
    parser.add_argument("--trainer_loop", action="store_true",
                        help="time the steps of GrapeTrainer.train() (a callback from step begin to step end) instead "
                             "of training_step plus the optimizer step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--critical_path", action="store_true",
                        help="time DFA's backward segment by segment instead of the training steps")
    parser.add_argument("--parallel_backward", type=int, default=0, metavar="CORES",
                        help="time the backward in wall time on CORES cores: BP and DFA's one backward against DFA "
                             "with parallel_backward=CORES (the segments' backwards on threads)")
    flags = parser.parse_args()
    hf_logging.set_verbosity_error()
    for model in (["gpt2", "vit"] if flags.model == "both" else [flags.model]):
        flags.model = model
        if flags.parallel_backward:
            parallel_backward(flags)
        else:
            critical_path(flags) if flags.critical_path else run(flags)


if __name__ == "__main__":
    main()
