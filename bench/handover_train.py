"""The real training phase for bench/handover.py: the WGSL engine on the handed-over GPU.

    python bench/handover.py --train-callable bench.handover_train:train

Creates the wgpu device and every buffer for the model (B=8, T=512, r=16 on all projections), says ready, runs
a few AdamW steps on random tokens, writes the PEFT adapter and releases the device.
"""
from __future__ import annotations

import numpy as np

from engine.lora.peft_write import export_adapter
from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig
from engine.backends.wgpu.backend import WgpuBackend

BATCH, SEQ, STEPS = 8, 512, 5


def train(model_dir, adapter_dir, ready):
    lora = LoraConfig(rank=16, alpha=32)
    backend = WgpuBackend(model_dir, lora, OptimizerConfig(), BATCH, SEQ)
    try:
        ready()
        rng = np.random.default_rng(0)
        pending = []
        for _ in range(STEPS):
            ids = rng.integers(0, backend.spec.vocab_size, (BATCH, SEQ)).astype(np.int32)
            pending.append(backend.train_step([(ids, ids.copy())], lr=1e-4, max_grad_norm=1.0))
        losses = [p.result().loss for p in pending]
        if not all(np.isfinite(losses)):
            raise RuntimeError(f"non-finite loss in the handover training phase: {losses}")
        export_adapter(adapter_dir, backend.lora_state(), lora, str(model_dir), {"steps": STEPS})
    finally:
        backend.close()
    return adapter_dir
