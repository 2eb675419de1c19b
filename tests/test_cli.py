"""`lorakit` command line: inspect an adapter folder; typed errors become a message and exit code 2."""
import torch
from torch import nn

import lorakit
from lorakit.cli import main


def test_inspect_lists_tensors(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, use_dora=True, target_modules=["0"]))
    lorakit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variant=dora r=2" in out
    assert "0.lora_A.weight" in out and "(2, 6)" in out and "0.lora_magnitude_vector" in out
    assert "3 tensors, 24 parameters" in out


def test_bad_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
