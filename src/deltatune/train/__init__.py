"""Training and evaluation: heads that cast tasks onto models, the accelerate loop, plots."""

from .heads import ClassifierHead, GenerationHead, VerbalizerHead, head_for
from .saved import load_saved, save_head
from .trainer import FULL_FT_LR, TrainConfig, TrainingDiverged, TrainResult, evaluate, fit, predict

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
    "load_saved",
    "predict",
    "save_head",
]
