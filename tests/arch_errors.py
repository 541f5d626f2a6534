"""Largest differences from transformers + PEFT (float32, eager attention) of both training backends, per tiny
architecture of bench/tiny_models.py: logits (absolute), loss (relative) and the worst LoRA gradient (relative to
that gradient's largest entry). One JSON object.

    python -m tests.arch_errors [--archs gemma3 granite ...] [--backends onnx wgpu]

A diagnostic beside tests/oracle.py (which it uses, so it lives here: benchmarks do not import tests); the
architecture tests (tests/model/test_<arch>.py) assert the same numbers against their tolerances.

Each model is random and seeded (tiny_models.make_model, seed 0), LoRA r=4, alpha=8 on all 7 projections with a
random non-zero B, one batch of B=2, T=7 with 30% of the labels masked. The WGSL backend runs on the best wgpu
adapter (lavapipe where there is no GPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

from bench.tiny_models import TINY_CONFIGS, make_model
from engine.backends.base import OptimizerConfig
from engine.lora.config import LoraConfig
from engine.model.spec import load_model_spec
from tests.oracle import loss_and_grads, peft_model, random_batch, random_lora_state

B, T = 2, 7


def errors(model_dir: Path, backend: str, ctx=None) -> dict:
    spec = load_model_spec(model_dir)
    lora = LoraConfig(rank=4, alpha=8)
    state = random_lora_state(spec, lora, seed=1)
    ids, labels = random_batch(spec.vocab_size, B, T, seed=2, masked_fraction=0.3)
    ref = loss_and_grads(peft_model(model_dir, lora, state), ids, labels)
    if backend == "wgpu":
        from engine.backends.wgpu.backend import WgpuBackend
        be = WgpuBackend(model_dir, lora, OptimizerConfig(), B, T, ctx=ctx, lora_state=state)
    else:
        from engine.backends.onnx import OnnxBackend
        be = OnnxBackend(model_dir, lora, OptimizerConfig(), B, T, init_state=state, threads=1)
    with be:
        logits = be.logits(ids)
        out = be.gradients([(ids, labels)])
    loss, _, grads = out
    worst = max((float(np.abs(grads[k] - g).max() / np.abs(g).max()), k) for k, g in ref.grads.items())
    return {"logits_max_abs": float(np.abs(logits - ref.logits).max()),
            "loss_rel": abs(loss - ref.loss) / abs(ref.loss), "grad_max_rel": worst[0], "worst_grad": worst[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(TINY_CONFIGS), choices=list(TINY_CONFIGS))
    parser.add_argument("--backends", nargs="+", default=["onnx", "wgpu"], choices=["onnx", "wgpu"])
    args = parser.parse_args()
    import onnxruntime
    import torch
    import transformers
    import wgpu

    ctx, adapter = None, None
    if "wgpu" in args.backends:
        from engine.backends.wgpu.context import GpuContext
        ctx = GpuContext.create()
        adapter = ctx.adapter.info["device"]
    result = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
              "wgpu": wgpu.__version__, "adapter": adapter, "errors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            model_dir = Path(tmp) / arch
            make_model(arch, model_dir)
            result["errors"][arch] = {b: errors(model_dir, b, ctx) for b in args.backends}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
