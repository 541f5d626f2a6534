"""Gemma 2 (Gemma2ForCausalLM): the spec as transformers builds the model, each of its quirks tested, and the
adapter through PEFT, chat and the merged export. The PEFT comparisons on both training backends (kept and
recomputed activations) are test_architectures.py's; the GGUF LoRA export is test_gguf.py's.

The tiny Gemma 2 (bench/tiny_models.py) has random (1+w) norms, soft caps low enough that tanh bends its scores
and logits, and sliding layers 0 and 2 with a window (4) shorter than the test sequences (7): dropping any quirk
moves the logits far beyond the tolerances (test_each_quirk_moves_the_logits).
"""
import dataclasses
import json

import numpy as np

from engine.model.spec import load_model_spec
from tests.arch_helpers import LORAS, T, assert_adapter_round_trip, config_dir, cpu_logits_with_spec, reference


def test_spec_reads_gemma2_as_transformers_builds_it(tiny_gemma2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(tiny_gemma2_dir)
    assert (spec.model_type, spec.activation, spec.norm_offset, spec.post_norms, spec.qk_norm) == (
        "gemma2", "gelu_tanh", 1.0, True, False)
    assert (spec.attn_softcap, spec.final_softcap) == (1.5, 2.5)
    assert spec.window_layers == (0, 2) and spec.sliding_window == 4 < T
    assert spec.local_rope is None and spec.rope.theta == 10000.0
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2_dir, dtype=torch.float32)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())
    assert model.model.embed_tokens.embed_scale.item() == spec.embed_scale == float(np.float32(68 ** 0.5))
    assert model.model.layers[1].self_attn.scaling == spec.attention_scale == 24 ** -0.5
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [4, None, 4]


def test_each_quirk_moves_the_logits(tiny_gemma2_dir):
    """The CPU backend with one Gemma 2 quirk of the spec turned off is far from transformers."""
    lora = LORAS["all-targets"]
    state, ids, labels, ref = reference(tiny_gemma2_dir, lora)
    spec = load_model_spec(tiny_gemma2_dir)
    plain = {"attn_softcap": None, "final_softcap": None, "window_layers": ()}
    for field, value in plain.items():
        logits = cpu_logits_with_spec(tiny_gemma2_dir, dataclasses.replace(spec, **{field: value}), lora, state, ids)
        assert np.abs(logits - ref.logits).max() > 1e-2, field


def test_gemma2_defaults_are_transformers_defaults(tmp_path):
    """A config.json that leaves the soft caps, layer_types, head_dim and window out gets Gemma2Config's defaults:
    caps 50 and 30, sliding and global layers alternating from a sliding one, window 4096, head_dim 256."""
    from transformers import AutoConfig

    folder = config_dir(tmp_path, "m", model_type="gemma2", num_hidden_layers=5)
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    spec = load_model_spec(folder)
    hf = AutoConfig.from_pretrained(folder)
    assert (spec.attn_softcap, spec.final_softcap) == (hf.attn_logit_softcapping, hf.final_logit_softcapping) == (
        50.0, 30.0)
    assert spec.window_layers == tuple(i for i, kind in enumerate(hf.layer_types) if kind == "sliding_attention") \
        == (0, 2, 4)
    assert spec.sliding_window == hf.sliding_window == 4096 and spec.head_dim == hf.head_dim == 256
    assert spec.attention_scale == 256 ** -0.5
    uncapped = load_model_spec(config_dir(tmp_path, "n", model_type="gemma2", attn_logit_softcapping=None,
                                          final_logit_softcapping=None))
    assert (uncapped.attn_softcap, uncapped.final_softcap) == (None, None)
    # Gemma 3 caps only where its config says so (Gemma3TextConfig's defaults are None); the kernels are shared.
    assert load_model_spec(config_dir(tmp_path, "g3", model_type="gemma3_text")).attn_softcap is None
    gemma3 = load_model_spec(config_dir(tmp_path, "g3c", model_type="gemma3_text", attn_logit_softcapping=20.0,
                                        final_logit_softcapping=9.0))
    assert (gemma3.attn_softcap, gemma3.final_softcap) == (20.0, 9.0)
    llama = load_model_spec(config_dir(tmp_path, "l", model_type="llama", final_logit_softcapping=9.0))
    assert llama.final_softcap is None          # LlamaForCausalLM never caps, whatever the config says


def test_adapter_loads_back_in_peft_and_chat_with_the_same_numbers(tiny_gemma2_dir, tmp_path):
    """The CPU backend's adapter as PEFT files: PEFT's loss is the backend's; chat (transformers + PEFT, which
    soft-caps as the model does) gives PEFT's logits; the merged folder gives them without PEFT."""
    assert_adapter_round_trip(tiny_gemma2_dir, tmp_path)
