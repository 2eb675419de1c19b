"""`lorakit` command line: inspect an adapter folder; typed errors become a message and exit code 2."""
import torch
from torch import nn

import lorakit
from lorakit.analysis import layer_table
from lorakit.cli import main


def test_inspect_lists_tensors(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_alpha=6, use_dora=True, target_modules=["0"],
                                                init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variant=dora r=2" in out
    assert "1 adapted layers, ranks [2], 24 adapter parameters" in out  # A 2x6 + B 4x2 + magnitude 4
    _, rows, _ = layer_table(tmp_path)
    layer = model[0]
    dense = 3.0 * (layer.adapters["default"].lora_B @ layer.adapters["default"].lora_A)
    assert rows[0]["shape"] == "4x6" and rows[0]["rank"] == 2
    assert abs(rows[0]["norm_delta"] - dense.norm().item()) < 1e-5 * dense.norm().item()


def test_bad_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
