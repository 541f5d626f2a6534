"""SmolLM3 (SmolLM3ForCausalLM) on both training backends and in the merged export, against transformers + PEFT.

SmolLM3 is Llama with some layers attending without rotary embeddings (no_rope_layers 0: "NoPE"); the tiny model
has layer 1 of 3 so.
"""
import dataclasses

import numpy as np

from engine.model.spec import load_model_spec
from tests.arch_helpers import LORAS, config_dir, cpu_logits_with_spec, reference


def test_spec_reads_the_nope_layers(tiny_smollm3_dir):
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(tiny_smollm3_dir)
    assert spec.nope_layers == (1,) and [spec.uses_rope(i) for i in range(3)] == [True, False, True]
    model = AutoModelForCausalLM.from_pretrained(tiny_smollm3_dir, dtype=torch.float32)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 0, 1]


def test_defaults_are_smollm3configs(tmp_path):
    """Every fourth layer without rope by default; with use_sliding_window, those layers are the windowed ones."""
    spec = load_model_spec(config_dir(tmp_path, "a", model_type="smollm3", num_hidden_layers=8))
    assert spec.nope_layers == (3, 7) and spec.window_layers == ()
    spec = load_model_spec(config_dir(tmp_path, "b", model_type="smollm3", num_hidden_layers=8,
                                       use_sliding_window=True, sliding_window=32))
    assert spec.window_layers == (3, 7) and spec.sliding_window == 32


def test_rope_in_the_nope_layer_would_be_wrong(tiny_smollm3_dir):

    lora = LORAS["all-targets"]
    state, ids, labels, ref = reference(tiny_smollm3_dir, lora)
    wrong = dataclasses.replace(load_model_spec(tiny_smollm3_dir), nope_layers=())
    logits = cpu_logits_with_spec(tiny_smollm3_dir, wrong, lora, state, ids)
    assert np.abs(logits - ref.logits).max() > 1e-2


