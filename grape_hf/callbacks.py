"""Trainer callbacks of grape_hf."""

import os

from transformers import TrainerCallback

PLOT_FILE = "alignment.png"


class AlignmentPlotCallback(TrainerCallback):
    """At the end of training, plot the logged alignment curves into `output_dir/alignment.png`:
    `alignment/*` (cos(B_k, T_k)) and `true_alignment/*` (cos(B_k e, dL/dh_k), the probe)."""

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for entry in state.log_history:
            for key, value in entry.items():
                if key.startswith(("alignment/", "true_alignment/")):
                    steps, values = curves.setdefault(key, ([], []))
                    steps.append(entry["step"])
                    values.append(value)
        if not curves:
            return
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        from matplotlib import pyplot as plt

        kinds = [kind for kind in ("alignment", "true_alignment") if any(k.startswith(kind + "/") for k in curves)]
        fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
        titles = {"alignment": "cos(B_k, Jacobian estimate)", "true_alignment": "cos(B_k e, true gradient)"}
        for ax, kind in zip(axes[0], kinds):
            for key, (steps, values) in curves.items():
                if key.startswith(kind + "/"):
                    name = key.split("/", 1)[1]
                    ax.plot(steps, values, label=name, linewidth=2.5 if name == "mean" else 1)
            ax.set(title=f"{titles[kind]} ({args.rule}, {args.setting})", xlabel="step", ylabel="cosine")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(args.output_dir, PLOT_FILE), dpi=120)
        plt.close(fig)


class EndFeedbackStepCallback(TrainerCallback):
    """Closes every optimizer step for the rule (`Rule.end_step`), saying whether the optimizer skipped
    it (fp16's GradScaler found inf/nan gradients): GrAPE then undoes that step's feedback update, so
    the matrices stay those the model was trained with. `trainer`: the `GrapeTrainer` (its
    accelerator knows whether the step was skipped)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.feedback is not None:
            self.trainer.feedback.end_step(skipped=self.trainer.accelerator.optimizer_step_was_skipped)
