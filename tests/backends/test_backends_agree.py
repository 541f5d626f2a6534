"""The WGSL engine and the CPU backend train the same: one short run, the same loss trajectory within 1e-3."""
import numpy as np
import pytest

from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from engine.backends.onnx import OnnxBackend
from tests.oracle import random_batch, random_lora_state

wgpu_backend = pytest.importorskip("engine.backends.wgpu.backend", reason="the WGSL engine is not merged into this branch")


@pytest.mark.gpu
def test_same_loss_trajectory_on_both_backends(tiny_llama_dir, gpu_device):
    spec = load_model_spec(tiny_llama_dir)
    lora = LoraConfig(rank=4, alpha=8)
    optim = OptimizerConfig(weight_decay=0.01)
    state = random_lora_state(spec, lora, seed=2)
    batches = [random_batch(spec.vocab_size, 2, 16, seed=s) for s in (30, 31, 32)]
    gpu = wgpu_backend.WgpuBackend(tiny_llama_dir, lora, optim, 2, 16, ctx=gpu_device, lora_state=state)
    cpu = OnnxBackend(tiny_llama_dir, lora, optim, 2, 16, init_state=state, threads=1)
    with gpu, cpu:
        results = {name: [b.train_step([batches[i % 3]], lr=5e-3, max_grad_norm=1.0).result() for i in range(6)]
                   for name, b in (("gpu", gpu), ("cpu", cpu))}
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([getattr(r, key) for r in results["gpu"]],
                                   [getattr(r, key) for r in results["cpu"]], rtol=1e-3, err_msg=key)
    assert [r.step for r in results["gpu"]] == [r.step for r in results["cpu"]] == list(range(1, 7))
    assert results["cpu"][-1].loss < results["cpu"][0].loss
