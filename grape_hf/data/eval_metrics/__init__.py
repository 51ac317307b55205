"""`evaluate` metric modules shipped inside the package, so metrics work offline.

`evaluate.load("accuracy")` downloads its script from the Hub; `evaluate.load(<local folder>)`
does not. `load_metric("accuracy")` loads the copy in this folder:

    accuracy = load_metric("accuracy")
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {'accuracy': 0.666...}
"""

import os

import evaluate

METRICS_DIR = os.path.dirname(os.path.abspath(__file__))


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the metric module `eval_metrics/<name>/<name>.py` with `evaluate.load` (no network).

    Args:
        name: a folder of this package, e.g. "accuracy".
        kwargs: passed to `evaluate.load` (e.g. `experiment_id` for several metrics at once).
    """
    path = os.path.join(METRICS_DIR, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        shipped = sorted(entry for entry in os.listdir(METRICS_DIR) if os.path.isfile(os.path.join(METRICS_DIR, entry, f"{entry}.py")))
        raise ValueError(f"No metric {name!r} ships with grape_hf; available: {', '.join(shipped)}.")
    return evaluate.load(path, **kwargs)
