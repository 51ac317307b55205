"""`GrapeTrainer`: the stock `Trainer` with a learning rule's feedback installed on the model.

The training step is the Trainer's own: the rule's hooks make the one `accelerator.backward(loss)`
deliver the rule's gradients, so loss scaling, gradient accumulation, clipping, logging and
checkpoints are untouched. The trainer drives only the `grape_hf.rule.Rule` interface: it installs
the rule of `args.rule`, hands it each training forward (`Rule.training_forward`), closes each
optimizer step (`Rule.end_step`, through a callback), logs its figures (`Rule.pop_logs`) and saves
its state (`Rule.state_dict`, in `feedback.safetensors` beside the Trainer's checkpoint files).
"""

import os

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy

from .arguments import DIRECT_RULES, GrapeTrainingArguments
from .callbacks import AlignmentPlotCallback, EndFeedbackStepCallback
from .checkpoint import load_feedback, save_feedback
from .diagnostics.audit import LocalityReport, audit_network, check_reached
from .diagnostics.loss_trend import LossTrend
from .diagnostics.probe import AlignmentProbe, forked_random_state
from .model_card import write_model_card
from .rule import Rule, installed_rule
from .rules import RULES


class GrapeTrainer(Trainer):
    """Same signature as `Trainer`; `args` must be `GrapeTrainingArguments`.

    Attributes:
        feedback: the installed rule (a `grape_hf.rule.Rule`: point names, matrices, tap), or None for
            rule 'bp'. `trainer.feedback.remove()` hands the model back exactly as it was.
        probe: the `AlignmentProbe` when `alignment_probe_steps` is set, else None.
        loss_trend: the `LossTrend` that warns, once, when a feedback rule's training loss climbs (None for 'bp').
        given_args: the arguments as given; `args` are the rule's, with its recommended fields resolved for the
            model (`trainer.feedback.settings` says which values came from where).
    """

    def __init__(self, model=None, args: GrapeTrainingArguments | None = None, *positional, **kwargs):
        if args is None:
            args = GrapeTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, GrapeTrainingArguments):
            raise TypeError(
                f"GrapeTrainer needs GrapeTrainingArguments, got {type(args).__name__}. Build them the same way "
                "(every TrainingArguments field works), adding rule=... and setting=..."
            )
        self.feedback: Rule | None = None
        self.probe: AlignmentProbe | None = None
        self.given_args = args  # as given; `self.args` becomes the rule's resolved copy (`_install_feedback`)
        self.loss_trend: LossTrend | None = None
        self._step_loss = 0.0  # this optimizer step's loss so far (its micro-batches' shares)
        self._feedback_step = -1  # optimizer step of the last feedback-aware forward
        self._reach_checked = False  # `check_reached` ran (after the first training step)
        self._model_card_kwargs: dict = {}  # the card's arguments given so far; later saves reuse them
        super().__init__(model, args, *positional, **kwargs)
        if self.is_fsdp_enabled and args.rule != "bp":  # FSDP2 under dfa, grape, drtp: grape_hf/fsdp.py
            from .fsdp import fsdp_refusal

            problem = fsdp_refusal(self.accelerator.state.fsdp_plugin, args.rule)
            if problem is not None:
                raise NotImplementedError(problem)
        if self.is_deepspeed_enabled and args.rule != "bp":
            raise NotImplementedError(
                f"DeepSpeed is not supported with rule={args.rule!r} yet: its resume path restores the model and "
                "optimizer without `_load_from_checkpoint`, so the rule's feedback state would silently start fresh, "
                "and ZeRO-3 re-gathers parameters from the very tensors the feedback points detach (as FSDP does). "
                "Use data parallelism without DeepSpeed (accelerate launch --multi_gpu, DDP), or rule='bp'."
            )
        if args.parallel_backward and args.rule in DIRECT_RULES:
            self._check_parallel_backward()
        if args.rule != "bp" and (args.torch_compile or isinstance(self.model, torch._dynamo.OptimizedModule)):
            raise NotImplementedError(
                f"torch.compile does not work with rule={args.rule!r}: a compiled graph does not run the rule's "
                "Python hooks (and one compiled earlier for the same model class is reused without them), so the "
                "model would train by plain backpropagation under the rule's name. Turn torch_compile off (and pass "
                "the uncompiled model), or use rule='bp'."
            )
        if args.rule != "bp":
            self.add_callback(AlignmentPlotCallback)
            self.add_callback(EndFeedbackStepCallback(self))
        if self.model_init is None:  # with model_init, call_model_init installs it on each new model
            self._install_feedback(self.model)

    def _check_parallel_backward(self) -> None:
        """Refuse `parallel_backward` where its threads would not run the segments side by side or would break
        the gradients' reduction: off CPU, and with more than one process."""
        problem = None
        if self.args.device.type != "cpu":
            problem = (f"it runs on CPU threads, and on {self.args.device.type} the autograd engine runs every "
                       "backward of a device on one thread (docs: results/speed; one CUDA stream per segment would)")
        elif self.args.world_size > 1 or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            problem = ("several processes reduce the gradients from hooks that one backward per step must fire "
                       "(DDP's reducer, FSDP), and the segments' backwards are separate calls")
        if problem is not None:
            raise ValueError(f"parallel_backward={self.args.parallel_backward} does not work here: {problem}. "
                             "Set parallel_backward=0.")

    def _install_feedback(self, model) -> None:
        if self.feedback is not None:
            self.feedback.remove()
        other = installed_rule(model)
        if self.args.rule == "bp" and other is not None:
            raise RuntimeError(
                f"rule='bp' was asked for, but this {type(model).__name__} still carries rule {other.name!r}'s hooks "
                "(from another GrapeTrainer or an audit), which would train it with that rule. Call "
                "`.feedback.remove()` on the trainer that installed them, or build a fresh model."
            )
        self.feedback = RULES[self.given_args.rule](model, self.given_args)
        if self.feedback is not None:  # the recommended fields resolved for this model: what the run really uses
            self.args = self.feedback.args
        steps = self.args.alignment_probe_steps
        self.probe = AlignmentProbe(self.feedback, steps) if steps and self.feedback is not None else None
        self.loss_trend = LossTrend(self.feedback.name) if self.feedback is not None else None

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; with `block_lr_scale` != 1 each of its parameter groups is split so that
        the rule's block parameters (`Rule.block_parameters`) get `lr * block_lr_scale` (schedulers, built
        after, scale from each group's own lr). An optimizer made before (a second `train()`) is returned as is."""
        made_now = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if not made_now or self.feedback is None or self.args.block_lr_scale == 1.0:
            return optimizer
        scale = self.args.block_lr_scale
        blocks = self.feedback.block_parameters()
        if not blocks:
            raise ValueError(f"block_lr_scale={scale} but rule {self.args.rule!r} has no blocks on this model "
                             "(block_lr_scale applies to dfa, grape and drtp): leave it at 1.")
        groups = []
        for group in optimizer.param_groups:
            inside = [p for p in group["params"] if id(p) in blocks]
            outside = [p for p in group["params"] if id(p) not in blocks]
            groups += [{**group, "params": outside}] if outside else []
            groups += [{**group, "params": inside, "lr": group["lr"] * scale}] if inside else []
        optimizer.param_groups = groups
        return optimizer

    def train(self, *positional, **kwargs):
        """The Trainer's `train`; every call starts counting optimizer steps afresh for the rule."""
        self._feedback_step = -1
        self._step_loss = 0.0
        if self.loss_trend is not None:
            self.loss_trend.reset()
        return super().train(*positional, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; after the first one, every trainable parameter must have received a gradient
        (`check_reached`), so that no placement leaves part of the model silently untrained. Checked after the
        step's last micro-batch: under FSDP2 the gradients reach the (sharded) parameters only once synced. Each
        optimizer step's loss goes to `loss_trend`."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.feedback is not None and not self._reach_checked and self.accelerator.sync_gradients:
            self._reach_checked = True
            check_reached(self.accelerator.unwrap_model(model), self.feedback, self._prepare_inputs(inputs))
        if self.loss_trend is not None:  # the micro-batches' losses are shares of the step's: summed
            self._step_loss += float(loss)
            if self.accelerator.sync_gradients:
                self.loss_trend.add(self.state.global_step, self._step_loss)
                self._step_loss = 0.0
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint plus `feedback.safetensors` (written first, so a checkpoint that has
        the Trainer's state also has the feedback's; one process writes it: all hold the same)."""
        if self.feedback is not None and self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_feedback(self.feedback, self.args, os.path.join(self._get_output_dir(trial=trial), folder))
        super()._save_checkpoint(model, trial)

    def _load_best_model(self) -> None:
        """The Trainer's best weights (`load_best_model_at_end`), then that checkpoint's feedback state, so the
        matrices are again those the best model was trained with."""
        super()._load_best_model()
        load_feedback(self.feedback, self.args, self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's weights, then the rule's feedback state (`grape_hf.checkpoint.load_feedback`
        raises rather than resume with fresh feedback)."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_feedback(self.feedback, self.args, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """The Trainer's; under FSDP, torch's bare assertion for an optimizer that holds no state, re-raised as an
        error that names the problem and the fix (`stateless_optimizer_error`); torch's bare "different number of
        parameter groups" when `block_lr_scale` splits the groups otherwise than the checkpoint's run did, re-raised
        naming the field. Nothing else changes."""
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except AssertionError as error:
            problem = stateless_optimizer_error(self, error)
            if problem is None:
                raise
            raise NotImplementedError(problem) from error
        except ValueError as error:
            if self.feedback is None or "different number of parameter groups" not in str(error):
                raise
            raise ValueError(
                f"{checkpoint} holds an optimizer whose parameter groups this run does not have: block_lr_scale="
                f"{self.args.block_lr_scale} gives the blocks {'no group' if self.args.block_lr_scale == 1.0 else 'a group'}"
                " of their own, and the checkpoint's run split them otherwise (block_lr_scale 1 against another value). "
                "Resume with the checkpoint's block_lr_scale (its feedback.safetensors header lists its settings), or "
                "start a fresh run.") from error

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._install_feedback(model)
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss; in training, its forward is the rule's (`Rule.training_forward`)."""
        if self.feedback is None or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step
        first_micro_batch = step != self._feedback_step
        self._feedback_step = step
        if self.probe is not None and self.probe.due(step, first_micro_batch):
            # On the unwrapped model: a forward with no backward must not reach DDP's reducer.
            unwrapped = self.accelerator.unwrap_model(model)
            # A copy of the inputs per forward: Trainer.compute_loss pops the labels under label smoothing.
            self.probe.measure(lambda: Trainer.compute_loss(self, unwrapped, dict(inputs)), self.args.device)
        compute = super().compute_loss  # the next class's: Trainer's, or SFTTrainer's (grape_hf.sft)

        def forward(batch):  # (loss, outputs), outputs None when not asked for (they may cost a forward)
            result = compute(model, batch, return_outputs, num_items_in_batch)
            return result if return_outputs else (result, None)

        loss, outputs = self.feedback.training_forward(forward, inputs, step, first_micro_batch)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the rule's alignment figures added to training logs."""
        if self.feedback is not None and "loss" in logs:
            logs = {**logs, **self.feedback.pop_logs(), **(self.probe.pop() if self.probe is not None else {})}
        super().log(logs, start_time)

    def create_model_card(self, command: str | None = None, **kwargs) -> None:
        """Write the grape_hf model card (`grape_hf.model_card`) as `output_dir/README.md`; `push_to_hub` calls it.

        Takes `Trainer.create_model_card`'s arguments (`dataset`: the data set really used, in words;
        `dataset_tags`/`dataset_args`: its Hub id and config, only when the Hub data set itself was used;
        `tags`, `tasks`, `language`, `license`, ...) and `command` (default: this process's command line).
        They are kept: the cards written by later saves and checkpoints carry them too.
        """
        if command is not None:
            kwargs["command"] = command
        self._model_card_kwargs = {**self._model_card_kwargs, **kwargs}
        if self.is_world_process_zero():
            write_model_card(self, self.args.output_dir, **self._model_card_kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, plus the model card (README.md) beside the weights, in checkpoints too."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        folders = {output_dir or self.args.output_dir}
        if self.args.push_to_hub and self.args.hub_strategy != HubStrategy.END:
            folders.add(self.args.output_dir)  # a checkpoint's push uploads output_dir too (weights copied there)
        for folder in folders:
            write_model_card(self, folder, **self._model_card_kwargs)

    def audit_locality(self, batch: dict | None = None, raise_on_leak: bool = True) -> LocalityReport:
        """Run the locality audit (`grape_hf.diagnostics.audit`) on `batch`, or on the first training batch."""
        if self.feedback is None:
            raise ValueError(f"rule={self.args.rule!r} has no feedback points to audit.")
        if batch is None:  # a new data loader's iterator draws its seed from the global generator: forked
            with forked_random_state(self.args.device):
                batch = next(iter(self.get_train_dataloader()))
        return audit_network(self.model, self.feedback, self._prepare_inputs(batch), raise_on_leak)

    def evaluate(self, *positional, **kwargs):
        """The Trainer's `evaluate`; under a feedback rule, on a fork of the random state, so that evaluating
        during training leaves the training that follows bitwise as without it (the evaluation data loader's
        iterator draws its seed from the global generator, which would move every later dropout mask). Rule
        'bp' keeps the stock Trainer's behaviour exactly."""
        if self.feedback is None:
            return super().evaluate(*positional, **kwargs)
        with forked_random_state(self.args.device):
            return super().evaluate(*positional, **kwargs)


def stateless_optimizer_error(trainer: Trainer, error: AssertionError) -> str | None:
    """The message for `error` when it is torch's `Expected device to be set` from resuming, under FSDP2 with full
    state dicts, an optimizer that holds no state tensor (plain SGD: `set_optimizer_state_dict` takes the device
    of the loaded state from the optimizer's own state, finds none and asserts); None for any other assertion."""
    if not trainer.is_fsdp_enabled or str(error) != "Expected device to be set":
        return None
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper: the torch one
    if any(isinstance(value, torch.Tensor) and value.dim() > 0
           for state in optimizer.state.values() for value in state.values()):
        return None  # it holds state: not the known failure
    return (
        f"Resuming {type(optimizer).__name__} under FSDP with full state dicts (state_dict_type FULL_STATE_DICT, the "
        "default) fails in torch's set_optimizer_state_dict ('Expected device to be set'): the optimizer holds no "
        "state tensors (as SGD without momentum), and torch takes the device of the loaded state from them. Train "
        "with an optimizer that holds state (SGD with momentum, optim_args='momentum=0.9'; AdamW), or save sharded "
        "checkpoints (fsdp_config={'state_dict_type': 'SHARDED_STATE_DICT'}, or fsdp_state_dict_type: "
        "SHARDED_STATE_DICT in accelerate's config). A checkpoint of SGD without momentum already written this way "
        "resumes when the resuming run sets momentum: the checkpoint's parameter groups (momentum 0) replace the "
        "run's, so training continues exactly as it was saved."
    )
