"""`GrapeTrainer`: the stock `Trainer` with a learning rule's feedback installed on the model.

The training step is the Trainer's own: the rule's points and error tap make the one
`accelerator.backward(loss)` deliver the rule's gradients, so loss scaling, gradient
accumulation, clipping, logging and checkpoints are untouched.
"""

import contextlib

import torch
from transformers import Trainer

from .arguments import GrapeTrainingArguments
from .audit import LocalityReport, audit_network
from .callbacks import AlignmentPlotCallback
from .metrics import RunningMeans
from .points import FeedbackNetwork
from .rules import RULES


class GrapeTrainer(Trainer):
    """Same signature as `Trainer`; `args` must be `GrapeTrainingArguments`.

    Attributes:
        feedback: the installed `FeedbackNetwork` (point names, matrices, tap), or None for rule 'bp'.
            `trainer.feedback.remove()` hands the model back exactly as it was.
    """

    def __init__(self, model=None, args: GrapeTrainingArguments | None = None, *positional, **kwargs):
        if args is None:
            args = GrapeTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, GrapeTrainingArguments):
            raise TypeError(
                f"GrapeTrainer needs GrapeTrainingArguments, got {type(args).__name__}. Build them the same way "
                "(every TrainingArguments field works), adding rule=... and setting=..."
            )
        self.feedback: FeedbackNetwork | None = None
        self._feedback_step = -1  # optimizer step of the last feedback-aware forward
        self._true_alignment = RunningMeans("true_alignment")  # the probe's cosines since the last log
        super().__init__(model, args, *positional, **kwargs)
        if args.rule != "bp":
            self.add_callback(AlignmentPlotCallback)
        if self.model_init is None:  # with model_init, call_model_init installs it on each new model
            self._install_feedback(self.model)

    def _install_feedback(self, model) -> None:
        if self.feedback is not None:
            self.feedback.remove()
        self.feedback = RULES[self.args.rule](model, self.args)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        self._install_feedback(model)
        return model

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, its forward wrapped by the rule (`_feedback_forward`) in training."""
        if self.feedback is None or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step
        first_micro_batch = step != self._feedback_step
        self._feedback_step = step
        probe = self.args.alignment_probe_steps
        if probe and first_micro_batch and step % probe == 0:
            # On the unwrapped model: a forward with no backward must not reach DDP's reducer.
            unwrapped = self.accelerator.unwrap_model(model)
            cosines = self.feedback.true_alignment(lambda: Trainer.compute_loss(self, unwrapped, inputs))
            self._true_alignment.add(cosines)
        with self._feedback_forward(step, first_micro_batch):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @contextlib.contextmanager
    def _feedback_forward(self, step: int, first_micro_batch: bool):
        """Decide what this training forward is: a true BP step (every `bp_calibration_steps`-th
        optimizer step), GrAPE's aligned forward (first micro-batch of an optimizer step, so every
        micro-batch of a gradient-accumulation step uses the same matrices), or a plain one."""
        calibration = self.args.bp_calibration_steps
        if calibration and (step + 1) % calibration == 0:
            self.feedback.bypass = True
            try:
                yield
            finally:
                self.feedback.bypass = False
        elif self.feedback.aligner is not None and first_micro_batch:
            with self.feedback.aligner.aligned_forward(self.model, step):
                yield
        else:
            yield

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the rule's alignment figures added to training logs."""
        if self.feedback is not None and "loss" in logs:
            if self.feedback.aligner is not None:
                logs = {**logs, **self.feedback.aligner.cosines.pop()}
            logs = {**logs, **self._true_alignment.pop()}
        super().log(logs, start_time)

    def audit_locality(self, batch: dict | None = None, raise_on_leak: bool = True) -> LocalityReport:
        """Run the locality audit (see `grape_hf.audit`) on `batch`, or on the first training batch."""
        if self.feedback is None:
            raise ValueError(f"rule={self.args.rule!r} has no feedback points to audit.")
        if batch is None:
            batch = next(iter(self.get_train_dataloader()))
        return audit_network(self.model, self.feedback, self._prepare_inputs(batch), raise_on_leak)
