"""The frozen-encoder baseline: mean-pooled sentence embeddings + a logistic-regression head.

This is what an adapter has to beat: the pretrained encoder untouched, only a linear classifier trained
(full batch, L-BFGS, a little L2), on the same train split, scored on the same test split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def mean_pooled(encoder, tokenizer, texts: list[str], batch_size: int = 128, max_length: int = 128,
                desc: str = "embedding", progress: bool = True) -> torch.Tensor:
    """(N, hidden) average of the last hidden states over real (non-padding) tokens (`progress`: a tqdm bar)."""
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    out = torch.empty(0)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        rows = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if not len(out):
            out = hidden.new_empty(len(texts), hidden.shape[-1])
        out[rows] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return out


def logistic_regression(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float = 1e-3,
                        steps: int = 200) -> torch.nn.Linear:
    """A multinomial logistic regression fitted by full-batch L-BFGS on standardised features."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    head = torch.nn.Linear(x.shape[1], num_labels)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    z = (x - mean) / std
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(z), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head


def frozen_encoder_accuracy(encoder, tokenizer, train, test, max_length: int = 128) -> float:
    """Test accuracy of a logistic-regression head on frozen mean-pooled embeddings."""
    x_train = mean_pooled(encoder, tokenizer, train.texts, max_length=max_length, desc="embedding train")
    x_test = mean_pooled(encoder, tokenizer, test.texts, max_length=max_length, desc="embedding test")
    head = logistic_regression(x_train, torch.tensor(train.labels), train.num_labels)
    with torch.no_grad():
        return (head(x_test).argmax(-1) == torch.tensor(test.labels)).float().mean().item()
