"""Every architecture beyond Llama/Qwen2/Qwen3 against transformers + PEFT, the same three ways: the CPU backend,
the WGSL backend (kept and recomputed activations, its memory plan equal to the allocation) and the merged export.
Each architecture's own quirks, and what it refuses, are tested in its own file (test_gemma3.py, ...)."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig, counted_tokens
from engine.backends.onnx import OnnxBackend
from engine.model.spec import load_model_spec
from tests.arch_helpers import B, LORAS, T, assert_matches_peft, lora_for, reference

MODELS = ["tiny_gemma3_dir", "tiny_granite_dir", "tiny_olmo2_dir", "tiny_smollm3_dir", "tiny_gemma2_dir",
          "tiny_phi3_dir", "tiny_phi4mini_dir"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("lora", list(LORAS))
def test_onnx_backend_matches_peft(request, model, lora):
    model_dir = request.getfixturevalue(model)
    lora = lora_for(model_dir, lora)
    state, ids, labels, ref = reference(model_dir, lora)
    with OnnxBackend(model_dir, lora, OptimizerConfig(), B, T, init_state=state, threads=1) as be:
        loss, tokens, grads = be.gradients([(ids, labels)])
        logits = be.logits(ids)
    assert tokens == counted_tokens(labels)
    assert_matches_peft(logits, loss, grads, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("lora", list(LORAS))
def test_wgpu_backend_matches_peft(request, gpu_device, model, lora, recompute):
    from engine.backends.wgpu.backend import WgpuBackend
    from engine.backends.wgpu.memory import memory_plan

    model_dir = request.getfixturevalue(model)
    lora = lora_for(model_dir, lora)
    state, ids, labels, ref = reference(model_dir, lora)
    before = gpu_device.bytes_allocated
    with WgpuBackend(model_dir, lora, OptimizerConfig(), B, T, ctx=gpu_device, lora_state=state,
                     recompute=recompute) as be:
        plan = memory_plan(load_model_spec(model_dir), lora, OptimizerConfig(), B, T,
                           gpu_device.max_binding_bytes, gpu_device.max_workgroups, recompute=recompute)
        assert be.memory_bytes() == gpu_device.bytes_allocated - before == plan.total
        logits = be.logits(ids)
        loss, _, grads = be.gradients([(ids, labels)])
    assert_matches_peft(logits, loss, grads, ref)


@pytest.mark.parametrize("model", MODELS[1:])       # Gemma 3's exports: test_gemma3.py (PEFT reload, chat, merged)
def test_merged_export_matches_peft(request, tmp_path, model):
    import torch

    from bench.peft_adapters import PROBE_TOKENS, load_base, make_adapter, peft_logits
    from engine.export.merged import export_merged

    model_dir = request.getfixturevalue(model)
    adapter_dir = make_adapter(model_dir, tmp_path / "adapter", seed=5,
                               target_modules=list(load_model_spec(model_dir).lora_targets))
    merged = load_base(export_merged(adapter_dir, model_dir, tmp_path / "merged").path)
    with torch.no_grad():
        got = merged(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, peft_logits(model_dir, adapter_dir), atol=1e-4, rtol=0)
