"""grape_hf: train Hugging Face models with Direct Feedback Alignment instead of global backpropagation."""

from .arguments import GrapeTrainingArguments
from .diagnostics.audit import LocalityError, LocalityReport
from .direct.placement import MICRO_SUBLAYERS, Placement, resolve_placement
from .models import MODEL_NAMES, build_image_model  # registers the image models with the Auto classes
from .rule import Rule
from .rules import RULES, audit_locality
from .trainer import GrapeTrainer

__all__ = [
    "GrapeTrainer",
    "GrapeTrainingArguments",
    "LocalityError",
    "LocalityReport",
    "MICRO_SUBLAYERS",
    "MODEL_NAMES",
    "Placement",
    "RULES",
    "Rule",
    "audit_locality",
    "build_image_model",
    "resolve_placement",
]
