"""The README demo end to end on a small slice of VADER movies (slow: real MiniLM training and evaluation)."""
import json

import pytest

from lorakit.demo import main


@pytest.mark.slow
def test_demo_runs_and_reloads_the_same_adapter(tmp_path):
    got = main(["--max-train-samples", "320", "--output-dir", str(tmp_path / "demo")])
    assert 0.6 < got["baseline_accuracy"] < 0.95  # logistic regression on 320 frozen embeddings
    assert got["reloaded_accuracy"] == got["test_accuracy"]  # the saved adapter is the trained one
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["steps"] == 10 and results["test_accuracy"] == got["test_accuracy"]
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
