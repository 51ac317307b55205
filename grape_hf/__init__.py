"""grape_hf: train Hugging Face models with Direct Feedback Alignment instead of global backpropagation."""

from .arguments import GrapeTrainingArguments
from .audit import LocalityError, LocalityReport, audit_locality
from .models import MODEL_NAMES, build_image_model  # registers the image models with the Auto classes
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
    "MODEL_NAMES",
    "Placement",
    "audit_locality",
    "build_image_model",
    "resolve_placement",
]
