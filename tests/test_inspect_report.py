"""`lorakit inspect ADAPTER --base MODEL --against OTHER --report OUT` and `lorakit reduce-intruders` (issue 21):
the JSON has one entry per adapted module with the required fields, the HTML's images all resolve to PNGs that
open and nothing points outside OUT, and the reduced adapter loads in PEFT."""
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

sys.path.insert(0, str(Path(__file__).parent / "serve"))
from fake_engine import save_adapter, tiny_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
FIELDS = ("rank", "scale", "singular_values", "effective_rank", "stable_rank", "intruders")


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src"))
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return (save_adapter(tiny_model_dir(), root / "a", r=4, seed=0),
            save_adapter(tiny_model_dir(), root / "b", r=8, seed=1, targets=("q_proj", "v_proj", "o_proj")))


def test_report_files(adapters, tmp_path, capsys):
    import matplotlib.image

    a, b = adapters
    out = tmp_path / "report"
    assert main(["inspect", str(a), "--base", str(tiny_model_dir()), "--against", str(b), "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Per block" in printed and "Interference with" in printed and "report.html" in printed
    report = json.loads((out / "report.json").read_text())
    paths = [f"base_model.model.model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert sorted(report["layers"]) == sorted(p.removeprefix("base_model.model.") for p in paths)
    for row in report["layers"].values():
        assert all(f in row for f in FIELDS) and row["rank"] == 4 and row["scale"] == 2.0
        assert len(row["singular_values"]) == 4 and row["singular_values"][0] > 0
        assert isinstance(row["intruders"], int) and 0 <= row["intruders"] <= 10
    pair = report["interference"][0]
    assert pair["summary"]["layers"] == 4 and Path(pair["other"]) == b
    links = Links()
    links.feed((out / "report.html").read_text())
    assert len(links.images) == 5  # spectra, norms, ranks, intruders, interference
    for src in links.images:
        png = out / src
        assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).shape[0] > 50
    assert not [u for u in links.urls if "://" in u or u.startswith("//") or u.startswith("/")]
    markdown = (out / "report.md").read_text()
    assert all(f"]({Path(src).name})" in markdown for src in links.images)


def test_plain_inspect_is_unchanged(adapters, capsys):
    assert main(["inspect", str(adapters[0])]) == 0
    assert "4 adapted layers, ranks [4]" in capsys.readouterr().out


def peft_logits(adapter, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir())), str(adapter))
    with torch.no_grad():
        return model.eval()(ids).logits


def test_reduce_intruders_cli_writes_a_peft_adapter(adapters, tmp_path, capsys):
    ids = torch.tensor([[1, 5, 9, 200, 3, 77]])
    base = ["--base", str(tiny_model_dir())]
    kept = tmp_path / "kept"
    assert main(["reduce-intruders", str(adapters[0]), str(kept), *base, "--exact", "--lam", "1"]) == 0
    counts = [int(line.split("intruders")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if "re-projection error" in line]
    assert len(counts) == 4 and sum(counts) > 0  # B ~ N(0, 0.5) on a random base: the update brings new directions
    assert torch.allclose(peft_logits(kept, ids), peft_logits(adapters[0], ids), atol=1e-4)  # λ = 1: unchanged
    reduced = tmp_path / "reduced"
    assert main(["reduce-intruders", str(adapters[0]), str(reduced), *base]) == 0
    config = json.loads((reduced / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and not config.get("rank_pattern")
    assert (peft_logits(reduced, ids) - peft_logits(adapters[0], ids)).abs().max() > 1e-3
    assert main(["reduce-intruders", str(adapters[0]), str(reduced), *base]) == 2  # not empty: refused
    assert "exists and is not empty" in capsys.readouterr().err
