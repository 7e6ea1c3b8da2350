"""Training and evaluation: objectives that cast tasks onto models, the accelerate loop, plots."""

from .evaluation import evaluate, predict
from .objectives import ClassifierObjective, GenerationObjective, VerbalizerObjective, has_lm_head, objective_for
from .saved import load_saved, save_head
from .trainer import FULL_FT_LR, TrainConfig, TrainingDiverged, TrainResult, fit

# the names these had before "head" came to mean only the model's task head; kept so existing code runs
ClassifierHead, GenerationHead, VerbalizerHead, head_for = (
    ClassifierObjective,
    GenerationObjective,
    VerbalizerObjective,
    objective_for,
)

__all__ = [
    "FULL_FT_LR",
    "ClassifierHead",
    "ClassifierObjective",
    "GenerationHead",
    "GenerationObjective",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "VerbalizerHead",
    "VerbalizerObjective",
    "evaluate",
    "fit",
    "has_lm_head",
    "head_for",
    "load_saved",
    "objective_for",
    "predict",
    "save_head",
]
