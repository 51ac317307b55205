"""The rule's state in a Trainer checkpoint: `feedback.safetensors` beside the Trainer's own files.

It holds what the rule learns or draws outside the model (`Rule.state_dict`): the
feedback matrices, GrAPE's smoothed targets and perturbation generator state. Its header says
which rule, setting, points and tap wrote it, so resuming with other settings fails with an
error instead of silently starting from fresh random feedback; it also lists the entries the file
holds (`entries`: an entry lost since is refused, never re-drawn) and how many processes wrote it
(`processes`: resuming with another number is warned about). A state that could not be resumed
(a non-finite or otherwise broken matrix) is never written, and the file is written whole or not
at all. Files of grape_hf before `entries` and `processes` (same format) are read without those
two checks. The model weights stay a plain transformers checkpoint: nothing of grape_hf is needed
to load them.
"""

import json
import logging
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .direct.matrices import matrix_problem, nonfinite_problem

FEEDBACK_FILE = "feedback.safetensors"
FORMAT = "grape_hf.feedback.v1"  # `entries` and `processes` are optional header keys: no new format needed

logger = logging.getLogger(__name__)


def feedback_metadata(rule, args) -> dict[str, str]:
    """The header of `feedback.safetensors`: format, rule, setting, point names (forward order), tap,
    the number of processes of the run and the rule's resolved recommended settings (`Rule.settings`;
    `save_feedback` adds the entries)."""
    return {"format": FORMAT, "rule": args.rule, "setting": args.setting,
            "points": json.dumps(list(rule.point_names)), "tap": rule.tap_name, "processes": str(args.world_size),
            "settings": json.dumps(rule.settings.values)}


def state_problem(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(entry, what is wrong) for the first entry of a feedback state that cannot be resumed: a matrix
    that is not float32, finite and nonzero (`matrix_problem`), or any other non-finite tensor; else None."""
    for key, value in state.items():
        problem = matrix_problem(value) if key.startswith("matrices.") else nonfinite_problem(value)
        if problem is not None:
            return key, problem
    return None


def save_feedback(rule, args, directory: str) -> str:
    """Write `rule.state_dict()` (CPU copies) and its metadata to `directory/feedback.safetensors`;
    returns the path.

    Refuses, with a `ValueError` naming the entry and the folder and writing nothing, a state that
    `state_problem` finds broken (e.g. NaN matrices): resuming from it would be refused anyway, and
    the earlier checkpoints stay the last good ones. The file is written to a temporary name and
    renamed (`os.replace`), so a failure never leaves a partial `feedback.safetensors`.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FEEDBACK_FILE)
    state = {key: value.detach().to("cpu").contiguous() for key, value in rule.state_dict().items()}
    found = state_problem(state)
    if found is not None:
        key, problem = found
        raise ValueError(
            f"Not writing {FEEDBACK_FILE} into {directory}: the feedback state entry {key!r} {problem}, so no run "
            f"could resume from it. The feedback of rule {args.rule!r} broke before this checkpoint: resume from an "
            "earlier checkpoint (with a lower learning rate or grape_lr if it diverged), or start a fresh run."
        )
    metadata = {**feedback_metadata(rule, args), "entries": json.dumps(sorted(state))}
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
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
    file, and a `ValueError` when the file is unreadable, was written by another rule, setting,
    set of points or tap, lacks an entry its header lists (`check_entries`), or holds a state the
    rule refuses (`Rule.load_state_dict`: broken matrices, lost entries; shapes are checked when
    each point first runs: `FeedbackMatrices.get`). Warns when another number of processes wrote it.
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
    check_entries(metadata, tensors, path)
    rule.load_state_dict(tensors, source=path)  # checks every entry (dtype, values, what the rule needs)
    warn_on_other_processes(metadata, args, path)
    warn_on_other_settings(metadata, expected, path)


def check_entries(metadata: dict[str, str], tensors: dict[str, torch.Tensor], path: str) -> None:
    """Raise a `ValueError` when the tensors of `path` are not the entries its header lists (files
    without the list, written before it, pass)."""
    if "entries" not in metadata:
        return
    try:
        listed = set(json.loads(metadata["entries"]))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} has a damaged header (entries: {error}). Resume from another checkpoint, or start "
                         "a fresh run.") from error
    missing, unlisted = sorted(listed - set(tensors)), sorted(set(tensors) - listed)
    if missing or unlisted:
        raise ValueError(
            f"{path} does not hold the entries its header lists"
            + (f": {missing} are missing" if missing else "") + (f", {unlisted} are not listed" if unlisted else "")
            + ". The file was changed after grape_hf wrote it, and resuming would re-draw or reset that state. Resume "
            "from an intact checkpoint of this run, or start a fresh run."
        )


def warn_on_other_processes(metadata: dict[str, str], args, path: str) -> None:
    """Warn when `path` was written by another number of processes than this run has (files without
    the number pass): the run continues, but it is no longer the uninterrupted run."""
    saved, now = metadata.get("processes"), args.world_size
    if saved is None or saved == str(now):
        return
    logger.warning(
        "%s was written by a run of %s processes and this run has %d: training goes on from the checkpoint, but no "
        "longer as the uninterrupted run would. The global batch changes from %s to %d times the per-device batch "
        "and gradient accumulation (scale one of them to keep it), and the position in the epoch is recounted in "
        "steps of the new batch.%s Resume with %s processes to continue the run exactly.",
        path, saved, now, saved, now,
        " GrAPE's perturbations are drawn per global batch, so its estimates and feedback updates differ from here "
        "on." if args.rule == "grape" else "", saved)


def warn_on_other_settings(metadata: dict[str, str], expected: dict[str, str], path: str) -> None:
    """Warn when `path` was written with other recommended settings (`feedback_init`, `block_lr_scale`, ...) than
    this run resolved (files without them pass): the feedback state fits, but the run no longer continues as it
    was (a value given differently, or another release's table)."""
    if "settings" not in metadata or metadata["settings"] == expected["settings"]:
        return
    saved, now = json.loads(metadata["settings"]), json.loads(expected["settings"])
    changed = {name: (saved.get(name), value) for name, value in now.items() if saved.get(name) != value}
    logger.warning("%s was written with other settings than this run resolves: %s. Training goes on from the checkpoint, "
                   "but no longer as the saved run would (the optimizer's learning rates are the checkpoint's); pass "
                   "the checkpoint's values to continue it exactly.", path,
                   ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items()))
