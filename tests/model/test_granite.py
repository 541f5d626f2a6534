"""Granite (GraniteForCausalLM) on both training backends and in the merged export, against transformers + PEFT.

The tiny Granite sets every multiplier away from 1 (embedding 3.5, attention 0.11, residual 0.22, logits 2.5), so
each one dropped moves the logits far beyond the tolerances (test_each_multiplier_moves_the_logits).
"""
import dataclasses

import numpy as np
import pytest

from engine.model.spec import UnsupportedModelError, load_model_spec
from tests.arch_helpers import LORAS, config_dir, cpu_logits_with_spec, reference


def test_spec_reads_the_multipliers(tiny_granite_dir):
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(tiny_granite_dir)
    assert (spec.embed_scale, spec.attention_scale, spec.residual_scale, spec.logits_scale) == (3.5, 0.11, 0.22, 2.5)
    assert (spec.norm_offset, spec.post_norms, spec.activation) == (0.0, False, "silu")
    model = AutoModelForCausalLM.from_pretrained(tiny_granite_dir, dtype=torch.float32)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())


def test_each_multiplier_moves_the_logits(tiny_granite_dir):

    lora = LORAS["all-targets"]
    state, ids, labels, ref = reference(tiny_granite_dir, lora)
    spec = load_model_spec(tiny_granite_dir)
    for field, value in {"embed_scale": 1.0, "score_scale": None, "residual_scale": 1.0, "logits_scale": 1.0}.items():
        logits = cpu_logits_with_spec(tiny_granite_dir, dataclasses.replace(spec, **{field: value}), lora, state,
                                      ids)
        assert np.abs(logits - ref.logits).max() > 1e-2, field


def test_gguf_export_is_refused_with_the_reason(tiny_granite_dir, tmp_path):
    from bench.peft_adapters import make_adapter
    from engine.export.gguf import export_gguf_adapter

    adapter_dir = make_adapter(tiny_granite_dir, tmp_path / "adapter", seed=5)
    with pytest.raises(ValueError, match="'granite' is not supported.*use --to merged"):
        export_gguf_adapter(adapter_dir, tiny_granite_dir, tmp_path / "a.gguf")


@pytest.mark.parametrize("flag", ["attention_bias", "mlp_bias"])
def test_granite_biases_are_refused(tmp_path, flag):
    with pytest.raises(UnsupportedModelError, match="Granite model with attention_bias or mlp_bias"):
        load_model_spec(config_dir(tmp_path, "m", model_type="granite", **{flag: True}))
