"""Where a training step's time goes, at the model shapes of issue 16 (random weights, LoRA r=16 on all seven
projections, T=512): per phase — the frozen projections' forward (x·Wᵀ), the LoRA branches' forward, attention
forward, the rest of the forward (norms, RoPE, SwiGLU, residuals, embedding), the LM head (logits, loss and
d(hidden)), the frozen projections' input gradients (dy·W), the LoRA backward (dB, dA, dx), attention backward,
the rest of the backward, and the optimizer (loss reduction, gradient norm, AdamW) — plus the pipelined step.

Each phase is encoded alone (every layer's kernels of that kind), submitted and waited for, best of
`--repeats`; the phases run on the buffers the warm-up step filled, so they compute real values. Phases add up
to a little more than a pipelined step (one wait each); the "other" phases are a whole pass minus its timed
parts, each part with its own submit and wait, so they are only meaningful where a phase takes well over a
millisecond (they go negative on tiny models). Every (model, batch, configuration) is guarded and
printed as one JSON line when done; `--time-budget` stops starting new ones after that many seconds.
    python bench/step_profile.py [--quick] [--models ...] [--batch-sizes 1 8] [--ours f32/f32 bf16/f16]
                                 [--repeats 2] [--time-budget S] [--out FILE]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.report import JsonLines  # noqa: E402
from bench.train_throughput import MODELS, POOL, model_spec  # noqa: E402
from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.backends.wgpu.backend import WgpuBackend  # noqa: E402
from engine.backends.wgpu.backward import model_backward  # noqa: E402
from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.backends.wgpu.forward import model_forward  # noqa: E402
from engine.backends.wgpu.microbench import random_weights  # noqa: E402
from engine.lora.config import LoraConfig, init_lora_state  # noqa: E402


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


def each_layer(m, encode):
    """An encoder callback running `encode(enc, layer kernels)` for every layer."""
    def run(enc):
        for k in m.layers:
            encode(enc, k)
    return run


def phases(be) -> dict:
    m = be.model

    def proj(kind):
        return each_layer(m, lambda enc, k: [getattr(p, f"encode_{kind}")(enc) for p in k.proj.values()])

    def lora(kind):
        return each_layer(m, lambda enc, k: [getattr(b, f"encode_{kind}")(enc)
                                             for b in [*k.lora.values(), *k.lora_groups.values()]])

    return {
        "forward": lambda enc: (be._load_slot(enc, 0), model_forward(enc, m)),
        "forward_frozen_linears": proj("forward"),
        "forward_lora": lora("forward"),
        "attention_forward": each_layer(m, lambda enc, k: k.attention.encode_forward(enc)),
        "lm_head": lambda enc: m.lm_head.encode(enc, backward=True),
        "backward": lambda enc: model_backward(enc, m),
        "backward_frozen_linears": proj("backward"),
        "backward_lora": lora("backward"),
        "attention_backward": each_layer(m, lambda enc, k: k.attention.encode_backward(enc)),
        "optimizer": lambda enc: (m.lm_head.encode_reduce(enc), be.grad_norm.encode(enc), be.optimizer.encode(enc)),
    }


def profile(ctx, spec, lora, batch_size: int, seq_len: int, repeats: int, tensors, weights: str = "f32",
            math: str = "f32") -> dict:
    rng = np.random.default_rng(0)
    with WgpuBackend(spec, lora, OptimizerConfig(), batch_size, seq_len, ctx=ctx, tensors=tensors,
                     lora_state=init_lora_state(spec, lora), weights=weights, math=math) as be:
        ids = rng.integers(0, spec.vocab_size, (batch_size, seq_len)).astype(np.int32)
        be.train_step([(ids, ids)], 1e-4, 1.0).result()     # warm-up; also stages the tokens
        out = {"batch_size": batch_size, "seq_len": seq_len, "weights": weights, "math": math,
               "f16_products": len(be.f16_products())}
        for name, encode in phases(be).items():
            total, encode_ms, dispatches = timed(be, encode, repeats)
            out[name] = {"ms": total, "encode_ms": encode_ms, "dispatches": dispatches}
        for whole, parts in (("forward", ("forward_frozen_linears", "forward_lora", "attention_forward")),
                             ("backward", ("backward_frozen_linears", "backward_lora", "attention_backward"))):
            out[f"{whole}_other"] = {"ms": out[whole]["ms"] - sum(out[p]["ms"] for p in parts)}
        start = time.perf_counter()
        pending = [be.train_step([(ids, ids)], 1e-4, 1.0) for _ in range(repeats)]
        pending[-1].result()
        step_ms = 1000 * (time.perf_counter() - start) / repeats
        out["pipelined_step"] = {"ms": step_ms, "tokens_per_s": batch_size * seq_len / step_ms * 1000}
        phase_sum = sum(out[p]["ms"] for p in ("forward", "lm_head", "backward", "optimizer"))
        out["share_of_phase_sum"] = {p: round(out[p]["ms"] / phase_sum, 3) for p in (
            "forward_frozen_linears", "forward_lora", "attention_forward", "forward_other", "lm_head",
            "backward_frozen_linears", "backward_lora", "attention_backward", "backward_other", "optimizer")}
        out["engine_bytes"] = be.memory_bytes()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS + ("tiny",))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 and 8")
    parser.add_argument("--ours", nargs="+", default=None, metavar="WEIGHTS/MATH",
                        help="configurations (default f32/f32 bf16/f16)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-budget", type=float, default=None, metavar="S")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    models = args.models or (["tiny"] if args.quick else list(MODELS))
    configs = args.ours or ["f32/f32", "bf16/f16"]
    seq_len = args.seq_len or (16 if args.quick else 512)
    lora = LoraConfig(rank=16, alpha=32)
    t0 = time.perf_counter()
    lines = JsonLines(args.out)
    emit = lines.emit

    ctx = GpuContext.create()
    import wgpu
    emit({"benchmark": "step_profile", "seq_len": seq_len, "configs": configs, "time_budget_s": args.time_budget,
          "machine": {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"),
                      "driver": ctx.adapter.info.get("description", ""), "shader_f16": ctx.has_f16,
                      "platform": platform.platform(), "wgpu": wgpu.__version__}})
    for name in models:
        spec = model_spec(name)
        tensors = None
        for batch in args.batch_sizes or ([1, 2] if args.quick else [1, 8]):
            for config in configs:
                row = {"model": name, "config": config, "batch_size": batch}
                if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
                    row["skipped"] = f"time budget {args.time_budget:g} s spent"
                else:
                    if tensors is None:
                        tensors = random_weights(spec, pool=0 if args.quick else POOL)
                    weights, math = config.split("/")
                    try:
                        row.update(profile(ctx, spec, lora, batch, seq_len, args.repeats, tensors, weights, math))
                    except Exception as exc:  # noqa: BLE001 — one failure must not lose the rest
                        row["error"] = f"{type(exc).__name__}: {exc}"
                        row["trace"] = traceback.format_exc(limit=3)[-800:]
                row["elapsed_s"] = round(time.perf_counter() - t0, 1)
                emit(row)
        del tensors
    emit({"done": True, "seconds": round(time.perf_counter() - t0, 1)})
    lines.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
