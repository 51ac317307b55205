"""A run that goes wrong says so: a warning, once, when a feedback rule's training loss climbs for a sustained
stretch (a rule's feedback can push a model away from its objective: DFA with random feedback on a
pretrained model climbs from 3.5 to 3.9 in 200 steps). It only observes the losses the Trainer computed.
"""

import logging

logger = logging.getLogger(__name__)


class LossTrend:
    """Watches the training loss of one run; warns once when it climbs.

    The loss of each training step is smoothed (exponential moving average, `decay`). After `warmup`
    steps, the lowest smoothed loss so far is kept; when the smoothed loss has stayed more than `rise`
    (relative) and `min_rise` (absolute: a loss near zero moves by more than 5 % in noise) above it for
    `patience` consecutive steps, a warning names the rule, the stretch (from the step of the lowest loss
    to now) and what to try. Noise around a plateau or a slowly falling loss stays well inside that.

    Args:
        rule: the rule's name, for the message.
        decay: the smoothing's decay (0.9).
        warmup: steps before the lowest loss is kept (10).
        rise: the relative climb that counts (5 %).
        min_rise: the absolute climb that counts at least (0.02).
        patience: the steps the climb must last (50).
    """

    def __init__(self, rule: str, decay: float = 0.9, warmup: int = 10, rise: float = 0.05, min_rise: float = 0.02,
                 patience: int = 50):
        self.rule = rule
        self.decay, self.warmup, self.rise, self.min_rise, self.patience = decay, warmup, rise, min_rise, patience
        self.reset()

    def reset(self) -> None:
        """Forget the run (a new `train()` call)."""
        self.smoothed: float | None = None
        self.seen = 0
        self.lowest: tuple[float, int] | None = None  # (smoothed loss, step)
        self.above = 0  # consecutive steps more than `rise` above the lowest
        self.warned = False

    def add(self, step: int, loss: float) -> bool:
        """Take the training loss of optimizer step `step`; returns whether this call warned."""
        if self.warned or loss != loss:  # NaN losses are the Trainer's and the guards' to report
            return False
        self.seen += 1
        self.smoothed = loss if self.smoothed is None else self.decay * self.smoothed + (1 - self.decay) * loss
        if self.seen < self.warmup:
            return False
        if self.lowest is None or self.smoothed < self.lowest[0]:
            self.lowest, self.above = (self.smoothed, step), 0
            return False
        margin = max(self.rise * abs(self.lowest[0]), self.min_rise)
        self.above = self.above + 1 if self.smoothed > self.lowest[0] + margin else 0
        if self.above < self.patience:
            return False
        self.warned = True
        low, low_step = self.lowest
        logger.warning(
            "rule=%r: the smoothed training loss has climbed from %.4g at step %d to %.4g at step %d (+%.0f %%) and "
            "stayed up for %d steps: the rule's updates are moving the model away from its objective. Try the "
            "recommended settings (leave feedback_init, block_lr_scale and grape_* unset: grape_hf.recommended), a "
            "lower learning_rate or block_lr_scale, feedback_init='identity' on a causal LM read on its residual "
            "stream, and compare with rule='bp' and with block_lr_scale=0 (blocks frozen).",
            self.rule, low, low_step, self.smoothed, step, 100 * (self.smoothed / low - 1), self.above)
        return True
