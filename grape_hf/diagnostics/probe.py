"""The true-alignment probe: how close each point's feedback is to the true gradient, measured
without changing training.

Every `alignment_probe_steps` optimizer steps, one extra plain forward on the current batch, with
the rule's points only observed (`Rule.observing`), and one `autograd.grad` of its loss give the
true `dL/dh_k` at every point and the error `e` at the tap; the rule's feedback for that `e` is
compared with them: `true_alignment/<point>` = cos(B_k e, dL/dh_k), and `/mean`.
"""

import torch

from ..rule import PROBE, Rule
from ..running_means import RunningMeans


def true_alignment(rule: Rule, forward) -> dict[str, float]:
    """Per point, cos(B_k e, true dL/dh_k) on one batch; `forward()` runs the model and returns the
    loss. Costs one forward and one backward; leaves every `.grad` untouched."""
    with rule.observing() as seen:
        loss = forward()
    names = list(seen.points)
    points = [seen.points[name] for name in names]
    *grads, error = torch.autograd.grad(loss, points + [seen.z])
    feedback = seen.feedback(error)
    return {name: float(torch.nn.functional.cosine_similarity(feedback[name].flatten(), grad.float().flatten(),
                                                              dim=0))
            for name, grad in zip(names, grads)}


class AlignmentProbe:
    """`true_alignment` every `steps` optimizer steps, averaged until the next log line.

    Refuses a rule without feedback points (FA, PEPITA), with the reason."""

    def __init__(self, rule: Rule, steps: int):
        rule.require_points(PROBE)
        self.rule = rule
        self.steps = steps
        self.means = RunningMeans("true_alignment")

    def due(self, step: int, first_micro_batch: bool) -> bool:
        """Whether optimizer step `step` is probed (on its first micro-batch)."""
        return first_micro_batch and step % self.steps == 0

    def measure(self, forward, device: torch.device) -> None:
        """Probe one batch (`forward()` returns its loss, on `device`) and keep the cosines for the next log
        line. The random state is forked, so the probe's forward (its dropout masks) leaves training's
        random numbers, and so the trained weights, exactly as without the probe."""
        devices = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            self.means.add(true_alignment(self.rule, forward))

    def pop(self) -> dict[str, float]:
        """`true_alignment/<point>` and `/mean` since the last call."""
        return self.means.pop()
