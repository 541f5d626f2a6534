"""SmolLM3 (SmolLM3ForCausalLM) on both training backends and in the merged export, against transformers + PEFT.

SmolLM3 is Llama with some layers attending without rotary embeddings (no_rope_layers 0: "NoPE"); the tiny model
has layer 1 of 3 so.
"""
import dataclasses

import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.backends.onnx import OnnxBackend
from engine.model.spec import load_model_spec
from tests.model.test_gemma3 import B, LORAS, T, _assert_matches, _config_dir, _reference


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
    spec = load_model_spec(_config_dir(tmp_path, "a", model_type="smollm3", num_hidden_layers=8))
    assert spec.nope_layers == (3, 7) and spec.window_layers == ()
    spec = load_model_spec(_config_dir(tmp_path, "b", model_type="smollm3", num_hidden_layers=8,
                                       use_sliding_window=True, sliding_window=32))
    assert spec.window_layers == (3, 7) and spec.sliding_window == 32


def test_rope_in_the_nope_layer_would_be_wrong(tiny_smollm3_dir):
    import engine.backends.onnx.backend as onnx_backend

    lora = LORAS["all-targets"]
    state, ids, labels, ref = _reference(tiny_smollm3_dir, lora)
    wrong = dataclasses.replace(load_model_spec(tiny_smollm3_dir), nope_layers=())
    original = onnx_backend.load_model_spec
    onnx_backend.load_model_spec = lambda _dir: wrong
    try:
        with OnnxBackend(tiny_smollm3_dir, lora, OptimizerConfig(), B, T, init_state=state, threads=1) as be:
            logits = be.logits(ids)
    finally:
        onnx_backend.load_model_spec = original
    assert np.abs(logits - ref.logits).max() > 1e-2


@pytest.mark.parametrize("lora", list(LORAS))
def test_onnx_backend_matches_peft(tiny_smollm3_dir, lora):
    state, ids, labels, ref = _reference(tiny_smollm3_dir, LORAS[lora])
    with OnnxBackend(tiny_smollm3_dir, LORAS[lora], OptimizerConfig(), B, T, init_state=state, threads=1) as be:
        loss, _, grads = be.gradients([(ids, labels)])
        logits = be.logits(ids)
    _assert_matches(logits, loss, grads, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_wgpu_backend_matches_peft(tiny_smollm3_dir, gpu_device, recompute):
    from engine.backends.wgpu.backend import WgpuBackend
    from engine.backends.wgpu.memory import memory_plan

    lora = LORAS["all-targets"]
    state, ids, labels, ref = _reference(tiny_smollm3_dir, lora)
    before = gpu_device.bytes_allocated
    with WgpuBackend(tiny_smollm3_dir, lora, OptimizerConfig(), B, T, ctx=gpu_device, lora_state=state,
                     recompute=recompute) as be:
        plan = memory_plan(load_model_spec(tiny_smollm3_dir), lora, OptimizerConfig(), B, T,
                           gpu_device.max_binding_bytes, gpu_device.max_workgroups, recompute=recompute)
        assert be.memory_bytes() == gpu_device.bytes_allocated - before == plan.total
        logits = be.logits(ids)
        loss, grads = be.gradients([(ids, labels)])
    _assert_matches(logits, loss, grads, ref)


def test_merged_export_matches_peft(tiny_smollm3_dir, tmp_path):
    import torch

    from bench.peft_adapters import PROBE_TOKENS, load_base, make_adapter, peft_logits
    from engine.export.merged import export_merged

    adapter_dir = make_adapter(tiny_smollm3_dir, tmp_path / "adapter", seed=5)
    merged = load_base(export_merged(adapter_dir, tiny_smollm3_dir, tmp_path / "merged").path)
    with torch.no_grad():
        got = merged(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, peft_logits(tiny_smollm3_dir, adapter_dir), atol=1e-4, rtol=0)
