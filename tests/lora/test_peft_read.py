"""Reading PEFT adapter folders: tensors, per-module scale and delta against PEFT itself, and the refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.lora.peft_read import check_fits_base, pattern_key, read_adapter, read_base_config
from bench.peft_adapters import load_base, make_adapter, quiet_peft


def _peft_layers(base_dir, adapter_dir):
    from peft import PeftModel

    with quiet_peft():
        model = PeftModel.from_pretrained(load_base(base_dir), adapter_dir)
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "default" in module.lora_A}


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8),
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
         alpha_pattern={"v_proj": 3.0}),
], ids=["plain", "rslora", "patterns"])
def test_modules_scale_and_delta_match_peft(tiny_llama_dir, tmp_path, config):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", **config)
    adapter = read_adapter(adapter_dir)
    layers = _peft_layers(tiny_llama_dir, adapter_dir)
    assert {m.name for m in adapter.modules} == set(layers)
    for mod in adapter.modules:
        layer = layers[mod.name]
        assert mod.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        np.testing.assert_array_equal(mod.a, layer.lora_A["default"].weight.detach().numpy())
        np.testing.assert_array_equal(mod.b, layer.lora_B["default"].weight.detach().numpy())
        np.testing.assert_allclose(mod.delta(), layer.get_delta_weight("default").detach().numpy(),
                                   rtol=1e-5, atol=1e-7)
    if config.get("use_rslora"):
        assert adapter.modules[0].scale == pytest.approx(16 / math.sqrt(8))


def test_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", "layers.1.mlp.down_proj", "v_proj"]
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.11.mlp.down_proj",
                 "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.xq_proj"]:
        assert pattern_key(keys, name) == get_pattern_key(keys, name)


@pytest.mark.parametrize("config, reason", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="lora_only"), "biases"),
], ids=["dora", "modules_to_save", "bias"])
def test_refuses_what_cannot_be_exported(tiny_llama_dir, tmp_path, config, reason):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", **config)
    with pytest.raises(ValueError, match=reason):
        read_adapter(adapter_dir)


def test_refuses_targets_outside_the_decoder_projections(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        read_adapter(adapter_dir)


def test_missing_and_broken_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="adapter config is a JSON list, expected an object"):
        read_adapter(tmp_path)


def test_rank_disagreeing_with_config_is_refused(tiny_llama_dir, tmp_path):
    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter", r=4)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["r"] = 8
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has rank 4 but adapter_config.json says 8"):
        read_adapter(adapter_dir)


def test_adapter_for_another_base_is_refused(tiny_model_dirs, tmp_path):
    adapter = read_adapter(make_adapter(tiny_model_dirs["llama"], tmp_path / "adapter"))
    with pytest.raises(ValueError, match="wrong base model"):
        check_fits_base(adapter, read_base_config(tiny_model_dirs["qwen2"]))


def test_bf16_adapter_is_read_exactly(tiny_llama_dir, tmp_path):
    """Adapters trained in bf16 are saved in bf16, which numpy cannot hold: read through torch, widened exactly."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    weights = adapter_dir / "adapter_model.safetensors"
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}
    save_file(bf16, weights)
    mod = read_adapter(adapter_dir).modules[0]
    key = f"base_model.model.{mod.name}.lora_B.weight"
    assert mod.b.dtype == np.float32
    np.testing.assert_array_equal(mod.b, bf16[key].float().numpy())


def test_legacy_bin_adapter_reads_like_safetensors(tiny_llama_dir, tmp_path):
    """Older PEFT wrote adapter_model.bin, some tools with the adapter name in the keys: both read the same."""
    import torch
    from safetensors.torch import load_file

    adapter_dir = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    expected = read_adapter(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    torch.save({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
               adapter_dir / "adapter_model.bin")
    weights.unlink()
    got = read_adapter(adapter_dir)
    assert [m.name for m in got.modules] == [m.name for m in expected.modules]
    for a, b in zip(got.modules, expected.modules):
        np.testing.assert_array_equal(a.a, b.a)
        np.testing.assert_array_equal(a.b, b.b)
        assert a.scale == b.scale
    (adapter_dir / "adapter_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        read_adapter(adapter_dir)
