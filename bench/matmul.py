"""GFLOP/s of the engine's GEMM (shaders/linear.wgsl) at the products a SmolLM2-135M training step runs.

For the lead's tuning runs on real GPUs: each product as the engine would dispatch it (auto: tile and split-K
chosen as in training), and with each tile (64×64, 128×64, 128×128) forced. Prints one JSON object.
    python bench/matmul.py [--quick] [--batch-sizes 1 8 32] [--repeats 20]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.backends.wgpu.kernels.linear import SPLIT_PARTIAL_FLOATS, TILES, GemmShape, Matmul  # noqa: E402
from engine.backends.wgpu.microbench import time_matmul  # noqa: E402


def products(bt: int, hidden: int = 576, kv: int = 192, mlp: int = 1536, rank: int = 16, vocab_chunk: int = 341,
             vocab: int = 49152) -> dict[str, GemmShape]:
    return {
        "q/o forward": GemmShape(bt, hidden, hidden, trans_b=True),
        "k/v forward": GemmShape(bt, kv, hidden, trans_b=True),
        "gate/up forward": GemmShape(bt, mlp, hidden, trans_b=True),
        "down forward": GemmShape(bt, hidden, mlp, trans_b=True),
        "gate/up input grad": GemmShape(bt, hidden, mlp),
        "down input grad": GemmShape(bt, mlp, hidden),
        "lora u = x·Aᵀ": GemmShape(bt, rank, mlp, trans_b=True),
        "lora dA (down)": GemmShape(rank, mlp, bt, trans_a=True),
        "lora dB (gate)": GemmShape(mlp, rank, bt, trans_a=True),
        "lm head logits chunk": GemmShape(min(bt, vocab_chunk), vocab, hidden, trans_b=True),
        "lm head d(hidden) chunk": GemmShape(min(bt, vocab_chunk), hidden, vocab),
    }


def time_product(ctx, shape: GemmShape, repeats: int, tile, partials) -> dict:
    rng = np.random.default_rng(0)
    a_rows = shape.K if shape.trans_a else shape.M
    b_rows = shape.N if shape.trans_b else shape.K
    a = ctx.upload(rng.standard_normal(a_rows * (shape.M if shape.trans_a else shape.K), np.float32), "a")
    b = ctx.upload(rng.standard_normal(b_rows * (shape.K if shape.trans_b else shape.N), np.float32), "b")
    c = ctx.buffer(4 * shape.M * shape.N, "c")
    mm = Matmul(ctx, c, a, b, shape, tile=tile, partials=partials)
    elapsed = time_matmul(ctx, mm, c, repeats)
    for buf in (a, b, c):
        buf.destroy()
    flops = 2.0 * shape.M * shape.N * shape.K * repeats
    return {"gflops": flops / elapsed / 1e9, "us": 1e6 * elapsed / repeats, "tile": mm.tile, "splits": mm.splits}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=16, vocabulary 2048, few repeats (smoke test)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    seq = 16 if args.quick else 512
    repeats = args.repeats or (1 if args.quick else 20)
    ctx = GpuContext.create()
    partials = ctx.buffer(4 * SPLIT_PARTIAL_FLOATS, "partials")
    import wgpu
    report = {"benchmark": "matmul", "seq_len": seq, "repeats": repeats,
              "machine": {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"),
                          "platform": platform.platform(), "wgpu": wgpu.__version__}, "results": []}
    for batch in args.batch_sizes:
        for name, shape in products(batch * seq, vocab=2048 if args.quick else 49152).items():
            row = {"batch_size": batch, "product": name, "M": shape.M, "N": shape.N, "K": shape.K}
            row["auto"] = time_product(ctx, shape, repeats, None, partials)
            for rows, cols in TILES:
                row[f"{rows}x{cols}"] = time_product(ctx, shape, repeats, (rows, cols), None)
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
