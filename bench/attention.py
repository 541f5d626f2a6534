"""Attention kernel speed: forward and backward of shaders/attention.wgsl on the chosen wgpu adapter, and, where
PyTorch sees a CUDA device, torch's scaled_dot_product_attention on the same shapes for scale. Prints JSON.

    python bench/attention.py [--shapes 1x2048x32x8x64,1x2048x32x8x128] [--iters 10] [--window 512]
        [--softcap 50]
`--window` / `--softcap` time the sliding-window and soft-capped kernels (Mistral/Gemma layers, Gemma 2) against
the plain causal ones of the same shapes (run once without them); their gflops still count the full causal work.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.backends.wgpu.kernels.attention import MAX_TILE_ROWS, ROWS, Attention  # noqa: E402


def time_encoded(ctx, record, iters: int) -> float:
    """Seconds per call of `record(enc)`: `iters` calls in one submission, after one warm-up submission."""
    sync = ctx.buffer(16, "sync")
    enc = ctx.encoder("bench")
    record(enc)
    enc.submit()
    ctx.read(sync)                      # a read waits for the queue to drain
    enc = ctx.encoder("bench")
    for _ in range(iters):
        record(enc)
    start = time.perf_counter()
    enc.submit()
    ctx.read(sync)
    return (time.perf_counter() - start) / iters


def bench_wgsl(ctx, B, T, NH, NKV, HD, iters, budget, rows, register_rows, window=None, softcap=None):
    rng = np.random.default_rng(0)
    q = ctx.upload(rng.standard_normal(B * T * NH * HD).astype(np.float32), "q")
    k = ctx.upload(rng.standard_normal(B * T * NKV * HD).astype(np.float32), "k")
    v = ctx.upload(rng.standard_normal(B * T * NKV * HD).astype(np.float32), "v")
    dout = ctx.upload(rng.standard_normal(B * T * NH * HD).astype(np.float32), "dout")
    out, dq = ctx.buffer(4 * B * T * NH * HD, "out"), ctx.buffer(4 * B * T * NH * HD, "dq")
    dk, dv = ctx.buffer(4 * B * T * NKV * HD, "dk"), ctx.buffer(4 * B * T * NKV * HD, "dv")
    lse = ctx.buffer(4 * B * NH * T, "lse")
    attn = Attention(ctx, B, T, NH, NKV, HD, q, k, v, out, lse, dout, dq, dk, dv, workgroup_budget=budget,
                     max_tile_rows=rows, register_rows=register_rows, window=window, softcap=softcap)
    fwd = time_encoded(ctx, attn.encode_forward, iters)
    bwd = time_encoded(ctx, attn.encode_backward, iters)
    parts = {entry: 1e3 * time_encoded(ctx, lambda enc, e=entry: attn.encode_entry(enc, e), iters)
             for entry in attn.backward_entries}
    return fwd, bwd, parts, attn.constants


def check_against_torch(ctx, B, T, NH, NKV, HD) -> dict:
    """Max abs error of out/dq/dk/dv against torch SDPA in float64 (CUDA if present), at full size."""
    import torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(1)
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in (
        ("q", (B, T, NH, HD)), ("k", (B, T, NKV, HD)), ("v", (B, T, NKV, HD)), ("dout", (B, T, NH, HD)))}
    bufs = {n: ctx.upload(a, n) for n, a in arrays.items()}
    for n, size in (("out", B * T * NH * HD), ("dq", B * T * NH * HD), ("dk", B * T * NKV * HD),
                    ("dv", B * T * NKV * HD), ("lse", B * NH * T)):
        bufs[n] = ctx.buffer(4 * size, n)
    attn = Attention(ctx, B, T, NH, NKV, HD, bufs["q"], bufs["k"], bufs["v"], bufs["out"], bufs["lse"],
                     bufs["dout"], bufs["dq"], bufs["dk"], bufs["dv"])
    enc = ctx.encoder()
    attn.encode_forward(enc)
    attn.encode_backward(enc)
    enc.submit()
    t = {n: torch.from_numpy(a).to(dev, torch.float64).transpose(1, 2).requires_grad_() for n, a in arrays.items()}
    ref = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True, enable_gqa=True)
    ref.backward(t["dout"])
    errors = {}
    for name, want in (("out", ref), ("dq", t["q"].grad), ("dk", t["k"].grad), ("dv", t["v"].grad)):
        want = want.detach().transpose(1, 2).cpu().numpy()
        got = ctx.read(bufs[name], count=want.size).reshape(want.shape)
        errors[f"max_abs_err_{name}"] = float(np.abs(got - want).max())
        errors[f"max_abs_{name}"] = float(np.abs(want).max())
    return errors


def bench_torch(B, T, NH, NKV, HD, iters):
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    q = torch.randn(B, NH, T, HD, device=dev, requires_grad=True)
    k = torch.randn(B, NKV, T, HD, device=dev, requires_grad=True)
    v = torch.randn(B, NKV, T, HD, device=dev, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
    torch.cuda.synchronize()
    fwd = (time.perf_counter() - t0) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(dout)
    torch.cuda.synchronize()
    return {"torch_f32_forward_ms": 1e3 * fwd, "torch_f32_fwd_plus_bwd_ms": 1e3 * (time.perf_counter() - t0) / iters,
            "torch": torch.__version__, "cuda_device": torch.cuda.get_device_name()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1x2048x32x8x64,1x2048x32x8x128,1x2048x16x4x256,4x512x14x2x64")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--check", action="store_true", help="also compare with torch SDPA in float64")
    parser.add_argument("--workgroup-budget", type=int, default=None,
                        help="workgroup memory budget in bytes (default: the adapter's limit)")
    parser.add_argument("--tile-rows", default=str(MAX_TILE_ROWS), help="comma-separated maximum tile rows")
    parser.add_argument("--register-rows", default=str(ROWS), help="comma-separated rows per workgroup")
    parser.add_argument("--window", type=int, default=None, help="sliding window in keys (default: none)")
    parser.add_argument("--softcap", type=float, default=None, help="attention-logit soft cap (default: none)")
    args = parser.parse_args()
    ctx = GpuContext.create()
    import wgpu
    report = {"adapter": ctx.label, "backend": ctx.adapter.info["backend_type"], "wgpu": wgpu.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "results": []}
    for shape in args.shapes.split(","):
        B, T, NH, NKV, HD = (int(x) for x in shape.split("x"))
        budget = args.workgroup_budget
        for rows, register_rows in ((int(r), int(rr)) for r in args.tile_rows.split(",")
                                    for rr in args.register_rows.split(",")):
            fwd, bwd, parts, constants = bench_wgsl(ctx, B, T, NH, NKV, HD, args.iters, budget, rows,
                                                    register_rows, args.window, args.softcap)
            flops = 2.0 * B * NH * T * T * HD                 # causal: half of 2 matmuls of 2*T*T*HD
            row = {"B": B, "T": T, "NH": NH, "NKV": NKV, "HD": HD, "workgroup_budget": budget,
                   "tiling": constants, "forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd,
                   "backward_parts_ms": parts, "forward_gflops": flops / fwd / 1e9,
                   "backward_gflops": 2.5 * flops / bwd / 1e9}
            report["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        if not args.no_torch:
            report["results"][-1].update(bench_torch(B, T, NH, NKV, HD, args.iters) or {})
        if args.check:
            report["results"][-1].update(check_against_torch(ctx, B, T, NH, NKV, HD))
            print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
