"""Training, evaluating and comparing adapters: `train(RunConfig)`, `Trainer`, `compare`."""
from .args import RunConfig, TrainingArguments
from .compare import compare
from .run import evaluate, train
from .tasks import make_task
from .trainer import StepHook, Trainer

__all__ = ["RunConfig", "StepHook", "Trainer", "TrainingArguments", "compare", "evaluate", "make_task", "train"]
