"""The rule's state in a Trainer checkpoint: `feedback.safetensors` beside the Trainer's own files.

It holds what the rule learns or draws outside the model (`Rule.state_dict`): the
feedback matrices, GrAPE's smoothed targets and perturbation generator state. Its header says
which rule, setting, points and tap wrote it, so resuming with other settings fails with an
error instead of silently starting from fresh random feedback. The model weights stay a plain
transformers checkpoint: nothing of grape_hf is needed to load them.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FEEDBACK_FILE = "feedback.safetensors"
FORMAT = "grape_hf.feedback.v1"


def feedback_metadata(rule, args) -> dict[str, str]:
    """The header of `feedback.safetensors`: format, rule, setting, point names (forward order) and tap."""
    return {"format": FORMAT, "rule": args.rule, "setting": args.setting,
            "points": json.dumps(list(rule.point_names)), "tap": rule.tap_name}


def save_feedback(rule, args, directory: str) -> str:
    """Write `rule.state_dict()` (CPU copies) and its metadata to `directory/feedback.safetensors`;
    returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FEEDBACK_FILE)
    state = {key: value.detach().to("cpu").contiguous() for key, value in rule.state_dict().items()}
    save_file(state, path, metadata=feedback_metadata(rule, args))
    return path


def read_feedback(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a feedback file; a file safetensors cannot read raises a `ValueError`."""
    try:
        with safe_open(path, "pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): the checkpoint is damaged. Resume "
                         "from another checkpoint or start a fresh run.") from error
    return metadata, tensors


def load_feedback(rule, args, directory: str) -> None:
    """Restore `rule` (None for rule 'bp') from `directory/feedback.safetensors`.

    Raises a `FileNotFoundError` when a rule with feedback resumes from a checkpoint without the
    file, and a `ValueError` when the file is unreadable or was written by another rule, setting,
    set of points or tap (shapes are checked when each point first runs: `FeedbackMatrices.get`).
    """
    path = os.path.join(directory, FEEDBACK_FILE)
    if rule is None:
        if os.path.exists(path):
            with safe_open(path, "pt") as file:
                rule = (file.metadata() or {}).get("rule")
            raise ValueError(f"{directory} was trained with rule={rule!r} (it holds {FEEDBACK_FILE}) but this run "
                             f"has rule={args.rule!r}. Resume with --rule {rule}, or load the weights with "
                             "`from_pretrained` to start a new run.")
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no {FEEDBACK_FILE}, so rule={args.rule!r} cannot resume its feedback from it (it was "
            "written by the stock Trainer, by rule 'bp', or not finished). Resume from a GrapeTrainer checkpoint of "
            "this rule, or load the weights with `from_pretrained` and start a new run."
        )
    metadata, tensors = read_feedback(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a grape_hf feedback file (format {metadata.get('format')!r}, expected "
                         f"{FORMAT!r}).")
    expected = feedback_metadata(rule, args)
    for key in ("rule", "setting", "tap", "points"):
        if metadata.get(key) != expected[key]:
            raise ValueError(f"{path} was written with {key}={metadata.get(key)} but this run has {key}="
                             f"{expected[key]}: the feedback does not fit. Resume with the checkpoint's settings, or "
                             "start a fresh run.")
    rule.load_state_dict(tensors, source=path)
