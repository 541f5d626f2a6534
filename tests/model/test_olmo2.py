"""OLMo 2 (Olmo2ForCausalLM) on both training backends and in the merged export, against transformers + PEFT.

OLMo 2 has no norm before the attention or the MLP (the projections read the residual stream), a norm on each
branch's output before its residual add, and q/k norms over the whole projection width ([QD], [KVD]) rather
than per head. The tiny model's norms are random (RANDOM_NORMS), so each of these matters.
"""
import dataclasses

import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.backends.onnx import OnnxBackend
from engine.model.spec import load_model_spec
from tests.model.test_gemma3 import B, LORAS, T, _assert_matches, _reference


def test_spec_reads_olmo2_as_transformers_builds_it(tiny_olmo2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_model_spec(tiny_olmo2_dir)
    assert (spec.pre_norms, spec.post_norms, spec.qk_norm, spec.qk_norm_full, spec.norm_offset) == (
        False, True, True, True, 0.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_olmo2_dir, dtype=torch.float32)
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())


def test_per_head_qk_norm_would_be_wrong(tiny_olmo2_dir):
    """The control: the same weights normed per head (as Qwen3) give other logits."""
    import engine.backends.onnx.backend as onnx_backend

    lora = LORAS["all-targets"]
    state, ids, labels, ref = _reference(tiny_olmo2_dir, lora)
    spec = load_model_spec(tiny_olmo2_dir)
    # Per head needs [HD] weights: tile the first head's, so the graph builds and only the grouping differs.
    wrong = dataclasses.replace(spec, qk_norm_full=False)
    original_spec, original_weights = onnx_backend.load_model_spec, onnx_backend.prepare_weights

    def per_head_weights(s, source):
        weights = original_weights(spec, source)
        for key in [k for k in weights if k.endswith(("q_norm", "k_norm"))]:
            weights[key] = weights[key][:spec.head_dim]
        return weights

    onnx_backend.load_model_spec = lambda _dir: wrong
    onnx_backend.prepare_weights = per_head_weights
    try:
        with OnnxBackend(tiny_olmo2_dir, lora, OptimizerConfig(), B, T, init_state=state, threads=1) as be:
            logits = be.logits(ids)
    finally:
        onnx_backend.load_model_spec, onnx_backend.prepare_weights = original_spec, original_weights
    assert np.abs(logits - ref.logits).max() > 1e-2


@pytest.mark.parametrize("lora", list(LORAS))
def test_onnx_backend_matches_peft(tiny_olmo2_dir, lora):
    state, ids, labels, ref = _reference(tiny_olmo2_dir, LORAS[lora])
    with OnnxBackend(tiny_olmo2_dir, LORAS[lora], OptimizerConfig(), B, T, init_state=state, threads=1) as be:
        loss, _, grads = be.gradients([(ids, labels)])
        logits = be.logits(ids)
    _assert_matches(logits, loss, grads, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
@pytest.mark.parametrize("lora", list(LORAS))
def test_wgpu_backend_matches_peft(tiny_olmo2_dir, gpu_device, lora, recompute):
    from engine.backends.wgpu.backend import WgpuBackend
    from engine.backends.wgpu.memory import memory_plan

    state, ids, labels, ref = _reference(tiny_olmo2_dir, LORAS[lora])
    before = gpu_device.bytes_allocated
    with WgpuBackend(tiny_olmo2_dir, LORAS[lora], OptimizerConfig(), B, T, ctx=gpu_device, lora_state=state,
                     recompute=recompute) as be:
        plan = memory_plan(load_model_spec(tiny_olmo2_dir), LORAS[lora], OptimizerConfig(), B, T,
                           gpu_device.max_binding_bytes, gpu_device.max_workgroups, recompute=recompute)
        assert be.memory_bytes() == gpu_device.bytes_allocated - before == plan.total
        logits = be.logits(ids)
        loss, grads = be.gradients([(ids, labels)])
    _assert_matches(logits, loss, grads, ref)


def test_merged_export_matches_peft(tiny_olmo2_dir, tmp_path):
    import torch

    from bench.peft_adapters import PROBE_TOKENS, load_base, make_adapter, peft_logits
    from engine.export.merged import export_merged

    adapter_dir = make_adapter(tiny_olmo2_dir, tmp_path / "adapter", seed=5)
    merged = load_base(export_merged(adapter_dir, tiny_olmo2_dir, tmp_path / "merged").path)
    with torch.no_grad():
        got = merged(torch.tensor([PROBE_TOKENS])).logits[0].numpy()
    np.testing.assert_allclose(got, peft_logits(tiny_olmo2_dir, adapter_dir), atol=1e-4, rtol=0)
