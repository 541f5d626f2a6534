import json

import numpy as np
import pytest

from engine.lora.config import LoraConfig, init_lora_state, peft_key
from engine.model.spec import UnsupportedModelError, load_model_spec


def test_spec_reads_each_architecture(tiny_model_dirs):
    llama = load_model_spec(tiny_model_dirs["llama"])
    assert (llama.hidden, llama.heads, llama.kv_heads, llama.head_dim) == (72, 3, 1, 24)
    assert llama.tied_embeddings and not llama.qkv_bias and not llama.qk_norm
    qwen2 = load_model_spec(tiny_model_dirs["qwen2"])
    assert qwen2.qkv_bias and not qwen2.tied_embeddings
    qwen3 = load_model_spec(tiny_model_dirs["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.q_dim == 128


def test_parameter_count_matches_torch(tiny_model_dirs):
    from transformers import AutoModelForCausalLM
    for folder in tiny_model_dirs.values():
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert load_model_spec(folder).parameter_count() == sum(p.numel() for p in model.parameters())


def test_unsupported_architecture_is_refused_with_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported: llama"):
        load_model_spec(tmp_path)


def test_lora_init_matches_peft(tiny_llama_dir):
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(tiny_llama_dir)
    config = LoraConfig(rank=4, alpha=8, targets=("v_proj", "q_proj"))
    assert config.targets == ("q_proj", "v_proj")
    state = init_lora_state(spec, config, seed=1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(peft_state) == set(state)
    for key, value in state.items():
        assert value.shape == tuple(peft_state[key].shape)
    a = state[peft_key(0, "q_proj", "A")]
    bound = 1 / np.sqrt(spec.hidden)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not state[peft_key(1, "v_proj", "B")].any()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert config.trainable_parameters(spec) == trainable
    assert torch.is_tensor(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight)


def test_lora_config_validation():
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets=("qkv",))
    assert LoraConfig(rank=16, alpha=32, use_rslora=True).scaling == pytest.approx(8.0)


def _config_dir(tmp_path, name, **config):
    """A model folder with config.json only (the spec needs no weights)."""
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128)
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    return folder


@pytest.mark.parametrize("config,want", [
    (dict(model_type="llama"), ()),
    (dict(model_type="llama", attention_bias=True), ("q_proj", "k_proj", "v_proj", "o_proj")),
    (dict(model_type="llama", mlp_bias=True), ("gate_proj", "up_proj", "down_proj")),
    (dict(model_type="qwen2"), ("q_proj", "k_proj", "v_proj")),
    (dict(model_type="qwen2", attention_bias=True, mlp_bias=True), ("q_proj", "k_proj", "v_proj")),
    (dict(model_type="qwen3", attention_bias=True, mlp_bias=True), ("q_proj", "k_proj", "v_proj", "o_proj")),
    (dict(model_type="mistral", attention_bias=True, mlp_bias=True), ()),
], ids=["llama", "llama-attention-bias", "llama-mlp-bias", "qwen2", "qwen2-ignores-flags",
        "qwen3-attention-bias", "mistral-ignores-flags"])
def test_biases_are_where_transformers_builds_them(tmp_path, config, want):
    """The biased projections are exactly those transformers' model class gives a bias (checked on the module)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _config_dir(tmp_path, "m", **config)
    spec = load_model_spec(folder)
    assert spec.bias_targets == want
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    layer = model.model.layers[0]
    built = tuple(t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if layer.self_attn.get_submodule(t).bias
                  is not None) + tuple(t for t in ("gate_proj", "up_proj", "down_proj")
                                       if layer.mlp.get_submodule(t).bias is not None)
    assert built == want
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    dict(model_type="mistral"),                                    # MistralConfig's default window: 4096
    dict(model_type="mistral", sliding_window=None),
    dict(model_type="mistral", sliding_window=12),
    dict(model_type="qwen2", sliding_window=12),                   # use_sliding_window defaults to False
    dict(model_type="qwen2", use_sliding_window=True, sliding_window=12, max_window_layers=2),
    dict(model_type="qwen3", use_sliding_window=True, sliding_window=12, max_window_layers=4),
    dict(model_type="qwen3", use_sliding_window=True, sliding_window=12,
         layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    dict(model_type="llama", sliding_window=12),                   # Llama has no window
], ids=["mistral-default", "mistral-none", "mistral-12", "qwen2-unused", "qwen2-from-layer-2",
        "qwen3-max-layers-all-full", "qwen3-layer-types", "llama"])
def test_sliding_window_layers_are_transformers_own(tmp_path, config):
    from transformers import AutoConfig

    folder = _config_dir(tmp_path, "m", **config)
    spec = load_model_spec(folder)
    hf = AutoConfig.from_pretrained(folder)
    window = getattr(hf, "sliding_window", None)
    if config["model_type"] == "mistral":
        want = tuple(range(4)) if window is not None else ()
    elif config["model_type"] == "llama":
        want = ()
    else:
        want = tuple(i for i, kind in enumerate(hf.layer_types) if kind == "sliding_attention" and window)
    assert spec.window_layers == want
    assert spec.sliding_window == (window if want else None)


def test_each_layer_has_its_own_window(tmp_path):
    spec = load_model_spec(_config_dir(tmp_path, "q", model_type="qwen2", use_sliding_window=True,
                                       sliding_window=12, max_window_layers=2))
    assert [spec.layer_window(i) for i in range(4)] == [None, None, 12, 12]
    mistral = load_model_spec(_config_dir(tmp_path, "m", model_type="mistral"))
    assert [mistral.layer_window(i) for i in range(4)] == [4096] * 4


def test_sliding_layers_without_a_window_are_refused(tmp_path):
    folder = _config_dir(tmp_path, "q", model_type="qwen2", sliding_window=None,
                         layer_types=["full_attention", "sliding_attention"] * 2)
    with pytest.raises(UnsupportedModelError, match=r"layers 1, 3 'sliding_attention' but the config sets no window"):
        load_model_spec(folder)
    folder = _config_dir(tmp_path, "c", model_type="qwen3", layer_types=["chunked_attention"] * 4)
    with pytest.raises(UnsupportedModelError, match=r"layer_types .*'chunked_attention'"):
        load_model_spec(folder)
