"""BP: stock backpropagation. Nothing is installed, so `GrapeTrainer.feedback` is None and the
Trainer's own step runs, bit for bit."""


def no_rule(model, args) -> None:
    """Install nothing on `model`."""
    return None
