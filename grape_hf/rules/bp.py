"""BP: stock backpropagation. No points, no hooks: `GrapeTrainer` runs the stock `Trainer` step."""


def build(model, args) -> None:
    """Install nothing."""
    return None
