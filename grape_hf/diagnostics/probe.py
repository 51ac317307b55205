"""The true-alignment probe: how close each point's feedback is to the true gradient, measured
without changing training.

Every `alignment_probe_steps` optimizer steps, one extra plain forward on the current batch, with
the rule's points only observed (`Rule.observing`), and one `autograd.grad` of its loss give the
true `dL/dh_k` at every point and the error `e` at the tap; the rule's feedback for that `e` is
compared with them: `true_alignment/<point>` = cos(B_k e, dL/dh_k), and `/mean`. Then the rule's own
measuring-only figures (`Rule.measure_alignment`: DFA's and DRTP's cos(B_k, T_k) from one estimating
forward) on a forward of their own.

Measuring never changes the run: every measuring forward runs inside `leaving_no_trace` (the random
state forked, so its dropout masks are the ones the training forward then draws afresh; every buffer
restored, so a BatchNorm's running statistics move only with training), writes no `.grad`, and the
training forward is the same with the probe on or off.
"""

import contextlib

import torch

from ..rule import PROBE, Rule
from ..running_means import RunningMeans


@contextlib.contextmanager
def forked_random_state(device: torch.device):
    """Inside, the global random state (CPU, and `device`'s) is a fork: what is drawn inside leaves the
    random numbers drawn after exactly as without it."""
    devices = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield


@contextlib.contextmanager
def leaving_no_trace(model: torch.nn.Module, device: torch.device | None = None):
    """Inside, forwards of `model` that only measure: the random state is forked (`forked_random_state`, on
    `device`, default the device of `model`'s first parameter) and every buffer of `model` gets its value back
    after (BatchNorm's running statistics and batch count move in a forward in training mode). Only a buffer
    that changed is written back: an unchanged one keeps its autograd version, so a graph that saved it (the
    audit's, in eval mode) can still run its backward after."""
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    try:
        with forked_random_state(device):
            yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                buffer = model.get_buffer(name)
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


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
        """Probe one batch (`forward()` returns its loss, on `device`; each call a fresh forward) and keep the
        cosines for the next log line: `true_alignment`, then the rule's `measure_alignment` (DFA: one dual
        forward). Each inside `leaving_no_trace`, so the trained weights, buffers and feedback are bitwise
        those of the run without the probe."""
        model = self.rule.model
        with leaving_no_trace(model, device):
            self.means.add(true_alignment(self.rule, forward))
        with leaving_no_trace(model, device):
            self.rule.measure_alignment(forward)

    def pop(self) -> dict[str, float]:
        """`true_alignment/<point>` and `/mean` since the last call."""
        return self.means.pop()
