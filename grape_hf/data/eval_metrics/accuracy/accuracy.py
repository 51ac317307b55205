"""Accuracy: the fraction of predictions equal to their references.

The same inputs and output as the Hub's `evaluate` "accuracy" module, computed with numpy
(no scikit-learn), shipped with grape_hf so that `evaluate.load(<this folder>)` works offline.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy = (number of correct predictions) / (number of predictions), in [0, 1]."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels, shape (N,).
    references (list of int): true labels, shape (N,).
    normalize (bool): if False, return the number of correct predictions instead of the fraction. Default True.
    sample_weight (list of float): weight of each prediction. Default None (all equal).
Returns:
    accuracy (float or int): the fraction (or number, or weighted sum) of correct predictions.
Examples:
    >>> accuracy = evaluate.load("grape_hf/data/eval_metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        if not normalize:
            return {"accuracy": int(total) if sample_weight is None else total}
        return {"accuracy": total / float(weights.sum())}
