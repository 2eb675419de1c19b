"""Training, evaluating and comparing adapters (or fully fine-tuning): `train(RunConfig)`, `Trainer`, `compare`."""
from .args import RunConfig, TrainingArguments
from .compare import compare
from .full import full_deltas, load_full
from .run import evaluate, train
from .tasks import make_task
from .trainer import StepHook, Trainer

__all__ = ["RunConfig", "StepHook", "Trainer", "TrainingArguments", "compare", "evaluate", "full_deltas",
           "load_full", "make_task", "train"]
