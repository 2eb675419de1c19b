"""The registry: variants are found by name; a variant PEFT cannot represent gets its own peft_type."""
import json

import pytest
import torch
from peft import PeftConfig
from torch import nn

import lorakit
from lorakit.variants import register_variant
from lorakit.variants.lora import LoRA


@register_variant
class HalfScaleLoRA(LoRA):
    """A toy variant for this test only: LoRA with half the scale. PEFT cannot represent it."""

    name = "test_half_scale"
    peft_type = "LORAKIT_TEST_HALF_SCALE"

    def delta(self, x, base_out):
        return 0.5 * super().delta(x, base_out)

    def delta_weight(self):
        return 0.5 * super().delta_weight()


def test_unknown_variant_is_refused_with_the_registered_names():
    with pytest.raises(lorakit.errors.UnknownVariantError, match="lora"):
        lorakit.AdapterConfig(variant="no_such_method")


def test_builtin_variants_registered():
    assert {"lora", "dora"} <= set(lorakit.variant_names())
    assert lorakit.AdapterConfig(use_dora=True).variant == "dora"
    assert lorakit.AdapterConfig(variant="dora").use_dora


def test_own_peft_type_round_trips_and_peft_refuses_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, variant="test_half_scale", target_modules=["0"],
                                                init_lora_weights=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
        with lorakit.disabled(model):
            assert not torch.allclose(model(x), ref)
    lorakit.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAKIT_TEST_HALF_SCALE" and saved["variant"] == "test_half_scale"
    with pytest.raises(Exception) as err:  # PEFT does not know this type: it must not load it as a LoRA
        PeftConfig.from_pretrained(str(tmp_path))
    assert "LORAKIT_TEST_HALF_SCALE" in str(err.value)
    fresh = nn.Sequential(nn.Linear(8, 8))
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in model.state_dict().items()
                           if "adapters" not in k})
    lorakit.load_adapter(fresh, tmp_path)
    assert lorakit.get_config(fresh).variant == "test_half_scale"
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, atol=1e-6)
