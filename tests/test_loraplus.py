"""LoRA+ (lorakit/optim/loraplus.py): parameter groups and their lrs (B at λ·lr, embedding-LoRA factors at the
embedding lr, biases/norms undecayed), the ratio kept through the trainer's schedule, options errors."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.optim import make_optimizer
from lorakit.train.args import TrainingArguments
from lorakit.train.tasks import make_task
from lorakit.train.trainer import Trainer, lr_factor
from tests.test_trainer import TOKENIZER, build, data, targs

pytestmark = pytest.mark.usefixtures("one_thread_module")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.norm(self.fc(self.emb(ids))))


def small():
    torch.manual_seed(0)
    model = Small()
    lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_alpha=4, target_modules=["emb", "fc"]))
    for p in (*model.norm.parameters(), *model.head.parameters()):
        p.requires_grad_(True)
    return model


def by_name(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
            for g in opt.param_groups}


def test_groups_and_lrs():
    model = small()
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, weight_decay=0.01)
    opt = make_optimizer("loraplus", model, args)
    assert isinstance(opt, torch.optim.AdamW)
    groups = by_name(opt, model)
    assert groups == {
        "lora_A": (1e-3, 0.01, ["fc.adapters.default.lora_A", "head.weight"]),
        "embedding": (1e-6, 0.01, ["emb.adapters.default.lora_A", "emb.adapters.default.lora_B"]),
        "lora_B": (pytest.approx(16e-3), 0.01, ["fc.adapters.default.lora_B"]),
        "lora_B_no_decay": (pytest.approx(16e-3), 0.0, ["head.bias", "norm.bias", "norm.weight"]),
    }
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    opt = make_optimizer("loraplus", model, args, loraplus_lr_ratio=4, loraplus_lr_embedding=5e-5,
                         loraplus_weight_decay=0.1)
    groups = by_name(opt, model)
    assert groups["lora_B"][:2] == (pytest.approx(4e-3), 0.1) and groups["embedding"][:2] == (5e-5, 0.1)
    assert groups["lora_A"][:2] == (1e-3, 0.1) and groups["lora_B_no_decay"][1] == 0.0


def test_ratio_survives_the_trainer_schedule(tmp_path):
    model = build()
    seen = []

    class Recorder:
        def before_optimizer_step(self, trainer):
            seen.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})
    tr = Trainer(model, make_task("classification", TOKENIZER, 32, 2),
                 targs(tmp_path, lr_scheduler_type="cosine", warmup_steps=1, max_steps=4, optim="loraplus",
                       optim_args={"loraplus_lr_ratio": 8}), data(), hooks=[Recorder()])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr.train()
    assert len(seen) == 4
    for step, lrs in enumerate(seen):
        f = lr_factor(step, 4, 1, "cosine")
        assert lrs["lora_A"] == pytest.approx(1e-2 * f, rel=1e-12, abs=1e-15)
        assert lrs["lora_B"] == pytest.approx(8e-2 * f, rel=1e-12, abs=1e-15)
    for g in tr.optimizer.param_groups:
        assert g["initial_lr"] == pytest.approx({"lora_A": 1e-2}.get(g["name"], 8e-2))
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)


@pytest.mark.parametrize("options,match", [
    ({"bogus": 1}, "bogus"), ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
    ({"loraplus_lr_ratio": "16"}, "loraplus_lr_ratio"), ({"loraplus_lr_embedding": -1.0}, "loraplus_lr_embedding"),
    ({"loraplus_weight_decay": float("nan")}, "loraplus_weight_decay")])
def test_options_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        make_optimizer("loraplus", small(), TrainingArguments(output_dir="unused"), **options)


def test_same_groups_as_peft():
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    ours = small()
    torch.manual_seed(0)
    theirs = get_peft_model(Small(), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc"]))
    for p in (*theirs.base_model.model.norm.parameters(), *theirs.base_model.model.head.parameters()):
        p.requires_grad_(True)
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                         loraplus_weight_decay=0.01)
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, weight_decay=0.01)
    opt = make_optimizer("loraplus", ours, args)

    def table(o, model, rename):
        names = {id(p): rename(n) for n, p in model.named_parameters()}
        return {names[id(p)]: (pytest.approx(g["lr"]), g["weight_decay"]) for g in o.param_groups for p in g["params"]}
    mine = table(opt, ours, lambda n: n.replace(".adapters.default.", ".").replace("lora_embedding_", "lora_"))
    peft = table(peft_opt, theirs, lambda n: n.removeprefix("base_model.model.").replace(".default.weight", "")
                 .replace(".default", "").replace("lora_embedding_", "lora_").replace(".base_layer", ""))
    assert len(mine) == 8 and mine == peft
