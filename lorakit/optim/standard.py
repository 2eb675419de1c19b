"""AdamW and SGD over the trainable parameters (the trainer's defaults)."""
from __future__ import annotations

import torch

from ..errors import TrainingError
from . import register_optimizer


def trainable(model) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters; inject an adapter first")
    return params


@register_optimizer("adamw")
def adamw(model, args, **options):
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
              weight_decay=args.weight_decay)
    return torch.optim.AdamW(trainable(model), **{**kw, **options})


@register_optimizer("sgd")
def sgd(model, args, **options):
    return torch.optim.SGD(trainable(model), **{"lr": args.learning_rate, "weight_decay": args.weight_decay,
                                                **options})
