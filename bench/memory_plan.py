"""What the WGSL engine allocates (engine.backends.wgpu.memory.memory_plan, equal to the allocation by test) for the
model shapes people fine-tune, with and without activation recompute. Arithmetic only: no GPU, no weights. JSON.

    python bench/memory_plan.py [--seq-len 512] [--rank 16] [--batch 1 --batch 8]

The shapes are the public Hugging Face configs' (hidden, MLP, layers, heads, KV heads, head size, vocabulary, tying,
Qwen2's q/k/v biases, Qwen3's q/k norms); r = rank on all 7 projections, AdamW, a desktop GPU's 2 GiB binding
limit (WebGPU's default 128 MiB cannot bind Llama-3.1-8B's MLP matrices).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.base import OptimizerConfig  # noqa: E402
from engine.backends.wgpu.memory import memory_plan  # noqa: E402
from engine.lora.config import LoraConfig  # noqa: E402
from engine.model.spec import ModelSpec, RopeSpec  # noqa: E402

# name: (type, vocab, hidden, layers, heads, kv heads, head_dim, MLP, tied, qkv bias, qk norm, rope theta)
SHAPES = {
    "Qwen3-0.6B": ("qwen3", 151936, 1024, 28, 16, 8, 128, 3072, True, False, True, 1e6),
    "Llama-3.2-1B": ("llama", 128256, 2048, 16, 32, 8, 64, 8192, True, False, False, 5e5),
    "Qwen2.5-1.5B": ("qwen2", 151936, 1536, 28, 12, 2, 128, 8960, True, True, False, 1e6),
    "Llama-3.2-3B": ("llama", 128256, 3072, 28, 24, 8, 128, 8192, True, False, False, 5e5),
    "Llama-3.1-8B": ("llama", 128256, 4096, 32, 32, 8, 128, 14336, False, False, False, 5e5),
}


def spec_of(name: str) -> ModelSpec:
    kind, vocab, hidden, layers, heads, kv, hd, mlp, tied, bias, qk_norm, theta = SHAPES[name]
    return ModelSpec(model_type=kind, vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                     head_dim=hd, intermediate=mlp, rms_eps=1e-6, rope=RopeSpec(theta=theta), tied_embeddings=tied,
                     qkv_bias=bias, qk_norm=qk_norm, max_positions=131072, source=f"{name}-shaped")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    parser.add_argument("--binding-limit", type=int, default=(1 << 31) - 4, help="max storage binding bytes")
    args = parser.parse_args(argv)
    lora, optim = LoraConfig(rank=args.rank, alpha=2 * args.rank), OptimizerConfig()
    rows = []
    for name in SHAPES:
        spec = spec_of(name)
        for B in args.batch or [1, 8]:
            kept, recomputed = (memory_plan(spec, lora, optim, B, args.seq_len, args.binding_limit,
                                                        recompute=r) for r in (False, True))
            rows.append({"model": name, "batch": B, "seq_len": args.seq_len, "layers": spec.layers,
                         "kept": kept.as_dict(), "recompute": recomputed.as_dict(),
                         "activation_bytes_per_layer": {"kept": kept.activations // spec.layers,
                                                        "recompute": recomputed.activations / spec.layers},
                         "saved_bytes": kept.total - recomputed.total,
                         "total_ratio": round(recomputed.total / kept.total, 4)})
    print(json.dumps({"machine": platform.node(), "python": platform.python_version(), "rank": args.rank,
                      "binding_limit": args.binding_limit, "plans": rows}, indent=1))


if __name__ == "__main__":
    main()
