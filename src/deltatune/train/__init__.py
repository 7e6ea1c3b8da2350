"""Training and evaluation: heads that cast tasks onto models, the accelerate loop, plots."""

from .heads import ClassifierHead, GenerationHead, VerbalizerHead, head_for
from .trainer import FULL_FT_LR, TrainConfig, TrainingDiverged, TrainResult, evaluate, fit

__all__ = [
    "FULL_FT_LR",
    "ClassifierHead",
    "GenerationHead",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "VerbalizerHead",
    "evaluate",
    "fit",
    "head_for",
]
