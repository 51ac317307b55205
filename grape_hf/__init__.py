"""grape_hf: train Hugging Face models with Direct Feedback Alignment instead of global backpropagation."""

from .arguments import GrapeTrainingArguments
from .audit import LocalityError, LocalityReport, audit_locality
from .placement import MICRO_SUBLAYERS, Placement, resolve_placement
from .points import FeedbackNetwork
from .trainer import GrapeTrainer

__all__ = [
    "GrapeTrainer",
    "GrapeTrainingArguments",
    "FeedbackNetwork",
    "LocalityError",
    "LocalityReport",
    "MICRO_SUBLAYERS",
    "Placement",
    "audit_locality",
    "resolve_placement",
]
