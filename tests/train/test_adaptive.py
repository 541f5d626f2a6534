"""AdaLoRA training (engine.train.adaptive over a backend) against PEFT's AdaLoraModel: the same initial adapter and
batches, torch AdamW, a schedule that crosses tinit and several budget steps into the final phase."""
from __future__ import annotations

import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.adalora import AdaLoraSettings
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.train.adaptive import AdaptiveRankBackend, backend_lora
from tests.adalora_oracle import peft_adalora_model, peft_adalora_run, peft_tensors
from tests.oracle import random_batch

SETTINGS = AdaLoraSettings(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=8)
TARGETS = ("q_proj", "v_proj", "down_proj")
ALPHA = 8.0
LR, CLIP, DECAY = 2e-2, 1.0, 0.01


def _run_both(model_dir, make_backend):
    spec = load_model_spec(model_dir)
    lora = backend_lora(LoraConfig(rank=SETTINGS.init_r, alpha=ALPHA, targets=TARGETS), SETTINGS)
    optim = OptimizerConfig(weight_decay=DECAY)
    batches = [random_batch(spec.vocab_size, 2, 9, seed=s) for s in (40, 41, 42)]
    ours = AdaptiveRankBackend(make_backend(model_dir, lora, optim), SETTINGS, optim, seed=5)
    start = ours.params.peft_tensors()
    with ours:
        results = [ours.train_step([batches[i % 3]], LR, CLIP).result() for i in range(SETTINGS.total_step)]
        final = ours.params.peft_tensors()
    model = peft_adalora_model(model_dir, SETTINGS, ALPHA, TARGETS, start)
    losses, patterns = peft_adalora_run(model, batches, LR, SETTINGS.total_step, ours.modules, CLIP, DECAY)
    return results, final, losses, patterns, peft_tensors(model)


def _check(results, final, losses, patterns, theirs):
    assert not any(r.skipped for r in results)
    np.testing.assert_allclose([r.loss for r in results], losses, rtol=1e-3)
    ranks = []
    for step, (result, pattern) in enumerate(zip(results, patterns), start=1):
        expected = SETTINGS.init_r * np.ones(len(pattern) if pattern is not None else 0, int)
        if pattern is None:
            assert step <= SETTINGS.tinit
            assert all(r == SETTINGS.init_r for row in result.rank_map for r in row)
        else:
            expected = pattern.sum(axis=1)
            assert np.array_equal(np.array(result.rank_map).ravel(), expected), f"step {step}"
        ranks.append(int(np.sum(expected)))
    # The budget really moved: full through tinit, falling, then the target total from total_step - tfinal.
    assert ranks[SETTINGS.tinit] < len(patterns[-1]) * SETTINGS.init_r
    assert ranks[-1] == ranks[-2] == ranks[-3] == len(patterns[-1]) * SETTINGS.target_r
    assert final.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_allclose(final[key], value, rtol=1e-3, atol=1e-3 * float(np.abs(value).max()),
                                   err_msg=key)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_cpu_backend_matches_peft_adalora(tiny_model_dirs, arch):
    from engine.backends.onnx import OnnxBackend

    def make(model_dir, lora, optim):
        return OnnxBackend(model_dir, lora, optim, 2, 9, threads=1)

    _check(*_run_both(tiny_model_dirs[arch], make))


@pytest.mark.gpu
def test_wgsl_backend_matches_peft_adalora(tiny_llama_dir, gpu_device):
    from engine.backends.wgpu.backend import WgpuBackend

    def make(model_dir, lora, optim):
        return WgpuBackend(model_dir, lora, optim, 2, 9, ctx=gpu_device)

    _check(*_run_both(tiny_llama_dir, make))
