"""Gemma 3 text (Gemma3ForCausalLM) on both training backends, in chat and in every export, against transformers +
PEFT; and the architectures and options still refused, by name.

The tiny Gemma 3 (bench/tiny_models.py) has random norm weights (transformers initialises them to zero, where
(1+w) = 1 would hide a norm that ignores its weight or its offset), query_pre_attn_scalar != head_dim, a global
layer between two sliding ones with different rope thetas, GeGLU and sqrt(hidden)-scaled embeddings: dropping
any quirk moves the logits far beyond the tolerances (test_each_quirk_moves_the_logits). Its sliding window on
sequences longer than the window is tested with the other windowed models (test_quirks.py, gemma3-window).
"""
import dataclasses
import json

import numpy as np
import pytest

from engine.model.spec import UnsupportedModelError, load_model_spec
from tests.arch_helpers import LORAS, assert_adapter_round_trip, config_dir, cpu_logits_with_spec, reference


def test_spec_reads_gemma3_as_transformers_builds_it(tiny_gemma3_dir):
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(tiny_gemma3_dir)
    assert (spec.model_type, spec.activation, spec.norm_offset, spec.post_norms, spec.qk_norm) == (
        "gemma3_text", "gelu_tanh", 1.0, True, True)
    assert spec.embed_scale == float(np.float32(76 ** 0.5))
    assert spec.attention_scale == 28 ** -0.5 != spec.head_dim ** -0.5
    assert spec.window_layers == (0, 2) and spec.sliding_window == 16
    assert [spec.layer_rope(i).theta for i in range(3)] == [10000.0, 1000000.0, 10000.0]
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())
    assert model.model.embed_tokens.embed_scale.item() == spec.embed_scale
    assert model.model.layers[1].self_attn.scaling == spec.attention_scale


def test_each_quirk_moves_the_logits(tiny_gemma3_dir):
    """The CPU backend with one quirk of the spec turned off is far from transformers: each quirk is tested."""

    lora = LORAS["all-targets"]
    state, ids, labels, ref = reference(tiny_gemma3_dir, lora)
    spec = load_model_spec(tiny_gemma3_dir)
    plain = {"norm_offset": 0.0, "post_norms": False, "activation": "silu", "embed_scale": 1.0,
             "score_scale": None, "local_rope": None}
    for field, value in plain.items():
        logits = cpu_logits_with_spec(tiny_gemma3_dir, dataclasses.replace(spec, **{field: value}), lora, state, ids)
        assert np.abs(logits - ref.logits).max() > 1e-2, field


def test_adapter_exports_load_back_with_the_same_numbers(tiny_gemma3_dir, tmp_path):
    """The backend's adapter written as PEFT files: PEFT's loss is the backend's; chat (transformers + PEFT)
    gives PEFT's logits; the merged folder gives them without PEFT."""
    assert_adapter_round_trip(tiny_gemma3_dir, tmp_path)


@pytest.mark.parametrize("config, message", [
    (dict(model_type="gemma3"), r"vision-language model.*gemma3_text\) is supported"),
    (dict(model_type="smollm3", no_rope_layers=[1, 2]), r"no_rope_layers \[1, 2\] is not one 0 or 1 per layer"),
    (dict(model_type="gemma2", final_logit_softcapping=-3.0), r"final_logit_softcapping is -3.0; expected a "
                                                               r"positive number or null"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), r"use_bidirectional_attention"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), r"use_bidirectional_attention"),
    (dict(model_type="gemma3_text", hidden_activation="gelu"), r"hidden_activation 'gelu' is unsupported"),
    (dict(model_type="gemma3_text", rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 8.0}}),
     r"rope scaling 'dynamic' is unsupported"),
    (dict(model_type="llama", rope_scaling={"rope_type": "longrope", "factor": 8.0}),
     r"longrope short_factor must be 4 positive numbers \(one per rotary pair of head_dim 8\), got None"),
], ids=["gemma3-multimodal", "smollm3-bad-nope", "gemma2-bad-softcap", "gemma2-bidirectional",
        "bidirectional", "gelu-exact", "gemma3-dynamic", "llama-longrope-without-factors"])
def test_what_is_not_computed_is_refused_by_name(tmp_path, config, message):
    with pytest.raises(UnsupportedModelError, match=message):
        load_model_spec(config_dir(tmp_path, "m", **config))


def test_gemma3_defaults_are_transformers_defaults(tmp_path):
    """A config.json that leaves layer_types, head_dim and the thetas out gets Gemma3TextConfig's defaults:
    five sliding layers then a global one, 1e6 and 1e4, window 4096, query_pre_attn_scalar 256."""
    folder = config_dir(tmp_path, "m", model_type="gemma3_text", num_hidden_layers=7)
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    spec = load_model_spec(folder)
    assert spec.window_layers == (0, 1, 2, 3, 4, 6) and spec.sliding_window == 4096
    assert (spec.rope.theta, spec.local_rope.theta, spec.head_dim) == (1_000_000.0, 10_000.0, 256)
    assert spec.attention_scale == 256 ** -0.5


def test_attention_bias_is_where_transformers_builds_it(tmp_path):
    """Gemma3Attention gives q/k/v/o a bias with attention_bias; its MLP never has one."""
    spec = load_model_spec(config_dir(tmp_path, "m", model_type="gemma3_text", attention_bias=True, mlp_bias=True))
    assert spec.bias_targets == ("q_proj", "k_proj", "v_proj", "o_proj")
