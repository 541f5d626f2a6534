"""Short measurements of an adapter for ETAs: matmul GFLOP/s and training tokens/s of a model-shaped engine.

Both run the real kernels (nothing is estimated from specs): `matmul_gflops` times the engine's tiled GEMM,
`training_throughput` times full training steps of a WgpuBackend built from a ModelSpec with random weights.
`step_flops` converts between the two for other model sizes (tokens/s ≈ GFLOP/s · 1e9 / flops per token).
"""
from __future__ import annotations

import time

import numpy as np

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.context import GpuContext
from engine.backends.wgpu.kernels.linear import GemmShape, Matmul
from engine.lora.config import LoraConfig, init_lora_state
from engine.model.hf_names import EMBED_WEIGHT, FINAL_NORM_WEIGHT, LM_HEAD_WEIGHT, layer_tensor
from engine.model.spec import ModelSpec, RopeSpec
from engine.backends.wgpu.buffers import frozen_layout


def smollm2_135m_spec() -> ModelSpec:
    """SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied."""
    return ModelSpec(model_type="llama", vocab_size=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                     intermediate=1536, rms_eps=1e-5, rope=RopeSpec(theta=100000.0), tied_embeddings=True,
                     qkv_bias=False, qk_norm=False, max_positions=8192, source="SmolLM2-135M-shaped (random)")


def tiny_spec() -> ModelSpec:
    """A small Llama for quick measurements (and tests) on slow adapters."""
    return ModelSpec(model_type="llama", vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                     intermediate=128, rms_eps=1e-5, rope=RopeSpec(theta=10000.0), tied_embeddings=True,
                     qkv_bias=False, qk_norm=False, max_positions=2048, source="tiny llama (random)")


def random_weights(spec: ModelSpec, seed: int = 0, std: float = 0.02, pool: int = 0) -> dict[str, np.ndarray]:
    """{HF name: float32 array} for every weight the engine uploads: normal matrices, unit norms, zero biases.

    `pool` > 0: every matrix repeats one pool of that many normal values from a random start (billions of
    independent draws take minutes on a CPU; throughput does not depend on the values)."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(pool, np.float32) * std).astype(np.float32) if pool else None
    out = {}
    for key, tensor in frozen_layout(spec, max_binding_bytes=1 << 62).items():
        shape = tensor.shape
        if key.startswith("embed."):
            name = EMBED_WEIGHT
        elif key.startswith("lm_head."):
            name = LM_HEAD_WEIGHT
        elif key == "final_norm":
            name = FINAL_NORM_WEIGHT
        else:
            _, layer, short = key.split(".")
            name = layer_tensor(int(layer), short)
        if len(shape) == 1:
            out[name] = (np.zeros if name.endswith(".bias") else np.ones)(shape, np.float32)
        elif pool:
            out[name] = np.resize(np.roll(values, int(rng.integers(pool))), shape)
        else:
            out[name] = (rng.standard_normal(shape, np.float32) * std).astype(np.float32)
    return out


def step_flops(spec: ModelSpec, lora: LoraConfig, tokens: int, seq_len: int, recompute: bool = False) -> float:
    """Floating-point operations of one training step over `tokens` tokens (forward + backward, LoRA only
    trainable: frozen matrices need their input gradient but no weight gradient). With `recompute`, the forward
    again of every layer but the last, without down_proj's output unless post-norms need it
    (engine.backends.wgpu.forward.layer_forward)."""
    dense = sum(o * i for o, i in map(spec.projection_shape, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj")))
    adapted = sum(lora.rank * sum(spec.projection_shape(t)) for t in lora.targets)
    per_token_layer = 2 * dense * 2 + 2 * adapted * 4            # fwd + dx for dense; fwd, dA, dB, dx for LoRA
    per_token_layer += 2 * 2 * seq_len * spec.q_dim * 3.5 / 2    # causal attention: QKᵀ, PV and their grads
    head = 2 * spec.hidden * spec.vocab_size * 2                  # logits + d(hidden)
    total = spec.layers * per_token_layer + head
    if recompute:
        down_out, down_in = spec.projection_shape("down_proj")
        again = 2 * dense + 2 * adapted + 2 * 2 * seq_len * spec.q_dim / 2
        if not spec.post_norms:     # Gemma's post-MLP norm needs down_proj's output: recomputed there
            again -= 2 * down_out * down_in
            if "down_proj" in lora.targets:
                again -= 2 * lora.rank * down_out                 # down_proj's LoRA computes u only
        total += (spec.layers - 1) * again
    return float(tokens) * total


def _wait(ctx: GpuContext, buf) -> None:
    ctx.read(buf, count=1)   # a read-back waits for everything submitted before it


def time_matmul(ctx: GpuContext, mm, out, repeats: int) -> float:
    """Seconds `repeats` dispatches of an encoded Matmul take in one submit, after a warm-up submit of one."""
    for n in (1, repeats):
        enc = ctx.encoder("bench")
        for _ in range(n):
            mm.encode(enc)
        start = time.perf_counter()
        enc.submit()
        _wait(ctx, out)
        elapsed = time.perf_counter() - start
    return elapsed


def matmul_gflops(ctx: GpuContext, size: int = 512, repeats: int = 8) -> float:
    """GFLOP/s of the engine's GEMM on size×size×size products (one warm-up submit, then `repeats`)."""
    rng = np.random.default_rng(0)
    a = ctx.upload(rng.standard_normal((size, size), np.float32), "bench.a")
    b = ctx.upload(rng.standard_normal((size, size), np.float32), "bench.b")
    c = ctx.buffer(4 * size * size, "bench.c")
    mm = Matmul(ctx, c, a, b, GemmShape(size, size, size, trans_b=True), label="bench.matmul")
    elapsed = time_matmul(ctx, mm, c, repeats)
    return 2.0 * size ** 3 * repeats / elapsed / 1e9


def training_throughput(ctx: GpuContext, spec: ModelSpec, lora: LoraConfig, batch_size: int, seq_len: int,
                        steps: int = 3, optim: OptimizerConfig | None = None, seed: int = 0,
                        tensors: dict | None = None, weights: str = "f32", math: str = "f32",
                        target_seconds: float | None = None) -> dict:
    """Tokens/s, ms/step and engine memory of full training steps (after one warm-up step), with the frozen
    weights held as `weights` and multiplied in `math` (WgpuBackend's options). `target_seconds`: time fewer
    than `steps` steps (at least 2, or `steps` if fewer) where the warm-up step says `steps` would take longer."""
    from engine.backends.wgpu.backend import WgpuBackend

    rng = np.random.default_rng(seed)
    tensors = tensors if tensors is not None else random_weights(spec, seed)
    with WgpuBackend(spec, lora, optim or OptimizerConfig(), batch_size, seq_len, ctx=ctx, tensors=tensors,
                     lora_state=init_lora_state(spec, lora, seed), weights=weights, math=math) as backend:
        ids = rng.integers(0, spec.vocab_size, (batch_size, seq_len)).astype(np.int32)
        batch = [(ids, ids)]
        start = time.perf_counter()
        backend.train_step(batch, 1e-4, 1.0).result()     # warm-up: pipelines compiled, caches filled
        warm = time.perf_counter() - start
        if target_seconds:
            steps = max(min(2, steps), min(steps, int(target_seconds / warm)))
        start = time.perf_counter()
        pending = [backend.train_step(batch, 1e-4, 1.0) for _ in range(steps)]
        last = pending[-1].result()
        elapsed = time.perf_counter() - start
        memory = backend.memory_bytes()
    tokens = batch_size * seq_len * steps
    return {"tokens_per_s": tokens / elapsed, "ms_per_step": 1000 * elapsed / steps, "engine_bytes": memory,
            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warm_up_s": warm,
            "weights": weights, "math": math, "last_loss": last.loss,
            "gflops": step_flops(spec, lora, tokens, seq_len) / elapsed / 1e9}


def measure(ctx: GpuContext | None = None, quick: bool = True) -> dict:
    """What the plan wizard and hardware inspector show: the adapter, GEMM GFLOP/s, a tiny model's tokens/s."""
    ctx = ctx or GpuContext.create()
    spec = tiny_spec()
    lora = LoraConfig(rank=8, alpha=16)
    size = 256 if quick else 1024
    return {"adapter": ctx.label, "matmul_gflops": matmul_gflops(ctx, size), "matmul_size": size,
            "training": training_throughput(ctx, spec, lora, 2 if quick else 8, 64 if quick else 256,
                                            steps=2 if quick else 5)}
