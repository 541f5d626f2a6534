"""OLMo 2 (Olmo2ForCausalLM) on both training backends and in the merged export, against transformers + PEFT.

OLMo 2 has no norm before the attention or the MLP (the projections read the residual stream), a norm on each
branch's output before its residual add, and q/k norms over the whole projection width ([QD], [KVD]) rather
than per head. The tiny model's norms are random (RANDOM_NORMS), so each of these matters.
"""
import dataclasses

import numpy as np

from engine.backends.base import OptimizerConfig
from engine.backends.onnx import OnnxBackend
from engine.model.spec import load_model_spec
from tests.arch_helpers import B, LORAS, T, reference


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
    state, ids, labels, ref = reference(tiny_olmo2_dir, lora)
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


