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
