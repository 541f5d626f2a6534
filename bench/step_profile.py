"""Where a training step's time goes: forward, LM head (+ its backward), backward, optimizer, and the CPU time
to encode the step, for a SmolLM2-135M-shaped model with random weights (LoRA r=16 on all projections).

Each phase is submitted and waited for on its own, so phases add up to a little more than a pipelined step.
    python bench/step_profile.py [--quick] [--batch-sizes 1 8 32] [--seq-len 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.lora.config import LoraConfig, init_lora_state  # noqa: E402
from engine.backends.wgpu.microbench import random_weights, smollm2_135m_spec, tiny_spec  # noqa: E402
from engine.backends.wgpu.backend import WgpuBackend  # noqa: E402
from engine.backends.wgpu.backward import model_backward  # noqa: E402
from engine.backends.wgpu.forward import model_forward  # noqa: E402


def timed(backend, encode, repeats: int) -> tuple[float, float, int]:
    """(GPU+submit ms, CPU encode ms, dispatches) of one encoded phase, best of `repeats`."""
    best_total, best_encode, dispatches = float("inf"), float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        enc = backend.ctx.encoder("profile")
        encode(enc)
        encoded = time.perf_counter()
        enc.submit()
        backend.ctx.read(backend.scratch.stats, count=1)
        done = time.perf_counter()
        best_total, best_encode = min(best_total, done - start), min(best_encode, encoded - start)
        dispatches = enc.dispatches
    return 1000 * best_total, 1000 * best_encode, dispatches


def profile(ctx, spec, lora, batch_size: int, seq_len: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    with WgpuBackend(spec, lora, OptimizerConfig(), batch_size, seq_len, ctx=ctx, tensors=random_weights(spec),
                     lora_state=init_lora_state(spec, lora)) as be:
        ids = rng.integers(0, spec.vocab_size, (batch_size, seq_len)).astype(np.int32)
        be.train_step([(ids, ids)], 1e-4, 1.0).result()     # warm-up; also stages the tokens
        m = be.model
        phases = {
            "forward": lambda enc: (be._load_slot(enc, 0), model_forward(enc, m)),
            "lm_head": lambda enc: m.lm_head.encode(enc, backward=True),
            "backward": lambda enc: model_backward(enc, m),
            "optimizer": lambda enc: (m.lm_head.encode_reduce(enc), be.grad_norm.encode(enc), be.optimizer.encode(enc)),
        }
        out = {"batch_size": batch_size, "seq_len": seq_len}
        for name, encode in phases.items():
            total, encode_ms, dispatches = timed(be, encode, repeats)
            out[name] = {"ms": total, "encode_ms": encode_ms, "dispatches": dispatches}
        start = time.perf_counter()
        pending = [be.train_step([(ids, ids)], 1e-4, 1.0) for _ in range(repeats)]
        pending[-1].result()
        step_ms = 1000 * (time.perf_counter() - start) / repeats
        out["pipelined_step"] = {"ms": step_ms, "tokens_per_s": batch_size * seq_len / step_ms * 1000}
        out["engine_bytes"] = be.memory_bytes()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    spec = tiny_spec() if args.quick else smollm2_135m_spec()
    ctx = GpuContext.create()
    import wgpu
    report = {"benchmark": "step_profile", "model": spec.source,
              "machine": {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"),
                          "platform": platform.platform(), "wgpu": wgpu.__version__}, "results": []}
    for batch in args.batch_sizes or ([1, 2] if args.quick else [1, 8, 32]):
        row = profile(ctx, spec, LoraConfig(rank=16, alpha=32), batch, args.seq_len or (16 if args.quick else 512),
                      args.repeats)
        report["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
