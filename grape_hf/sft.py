"""TRL's supervised fine-tuning under any rule: `GrapeSFTConfig` and `GrapeSFTTrainer`.

    from grape_hf.sft import GrapeSFTConfig, GrapeSFTTrainer
    args = GrapeSFTConfig(output_dir="out", rule="grape", setting="micro")
    GrapeSFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer).train()

Both are plain multiple inheritance of TRL's classes and grape_hf's (needs `pip install grape_hf[trl]`):
- `GrapeSFTConfig(SFTConfig, GrapeTrainingArguments)`: SFTConfig comes first, so its own defaults
  (learning rate 2e-5, bf16, logging every 10 steps, ...) win over `TrainingArguments`' (the other order
  silently resets them), and the rule's fields are added. One exception: gradient checkpointing, on by
  default in SFTConfig, is off here, because the rules refuse it (recomputing a block runs its feedback
  hooks twice); `rule="bp"` may turn it on.
- `GrapeSFTTrainer(GrapeTrainer, SFTTrainer)`: SFTTrainer's data preparation, collator, fused LM-head
  loss and metrics, with the rule's forward around SFTTrainer's `compute_loss` (`GrapeTrainer.compute_loss`
  calls the next class's). The fused head never calls `lm_head`, so the error cannot be read on its
  input; the direct rules read it on the residual stream (`error_point="residual"`, the input of the
  final norm, where the loss's true gradient arrives through the fused head's own backward), which
  is also where DFA and GrAPE learn language models best (docs: how-to/language-models).
- `peft_config=` (TRL's PEFT path): SFTTrainer wraps the model with `get_peft_model` before `GrapeTrainer`
  installs the rule on the wrapped model, so the adapters train as through `get_peft_model` itself (only they
  move; the frozen base's points are cuts). Prompt-learning adapters are refused with the reason
  (`grape_hf.direct.placement.refuse_prompt_learning`); tests/test_peft.py runs LoRA under dfa and grape.
"""

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from .arguments import DIRECT_RULES, GrapeTrainingArguments
from .trainer import GrapeTrainer


@dataclass
class GrapeSFTConfig(SFTConfig, GrapeTrainingArguments):
    """`SFTConfig` with the fields of `GrapeTrainingArguments` (rule, setting, ...); SFTConfig's defaults."""

    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Off by default (SFTConfig: on): the rules other than 'bp' refuse it, since recomputing a "
                          "block would run its feedback hooks twice."},
    )

    def __post_init__(self):
        if self.rule in ("dfa", "grape") and self.error_point is None:
            self.error_point = "residual"  # the fused LM head never calls lm_head: see the module docstring
        super().__post_init__()
        if self.rule == "drtp":
            raise ValueError(
                "rule='drtp' cannot train under SFTTrainer: DRTP projects the one-hot target where the logits are, "
                "and SFTTrainer's fused LM-head loss never builds the logits. Use rule='dfa' or 'grape'."
            )
        if self.rule in DIRECT_RULES and self.error_point in ("head_input", "logits"):
            raise ValueError(
                f"error_point={self.error_point!r} cannot be read under SFTTrainer: its fused LM-head loss "
                "computes the log-probabilities from lm_head's weight without calling lm_head, so neither its "
                "input nor its logits exist as a module's tensors. Use error_point='residual' (the default here)."
            )


class GrapeSFTTrainer(GrapeTrainer, SFTTrainer):
    """`SFTTrainer` under `args.rule`; takes SFTTrainer's arguments, with `args` a `GrapeSFTConfig`."""

    def __init__(self, model, args: GrapeSFTConfig | None = None, **kwargs):
        if not isinstance(args, GrapeSFTConfig):
            raise TypeError(
                f"GrapeSFTTrainer needs a GrapeSFTConfig, got {type(args).__name__}: it keeps SFTConfig's defaults "
                "and adds the rule's fields (a GrapeTrainingArguments would reset SFTConfig's defaults)."
            )
        super().__init__(model, args, **kwargs)
