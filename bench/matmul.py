"""TFLOP/s of the engine's GEMM (shaders/linear.wgsl) against torch fp32 (no TF32) and bf16, on the same GPU.

Products: the big square-ish shapes of issue 16, and every product of a training step (frozen projections
forward and input-grad, LoRA u / dA / dB, LM head chunks) for SmolLM2-135M at B·T = 512·{1, 8, 32} and for
Qwen3-0.6B and Llama-3.2-1B at B·T = 512 and 4096. Each product runs as the engine dispatches it ("auto": tile and
split-K as in training) and, for products whose B is a frozen weight, with that weight stored as f16 and bf16,
and multiplied in half precision (shaders/linear_f16.wgsl, "auto_f16math": f16 weights, its row-scale pass
included), and with the tile the autotune measures ("tuned", "tuned_f16math"; a real GPU only). With --tiles
each tile is also timed forced (64×64, 128×64, 128×128, no split; the f16-math GEMM's too). --sweep times every
kernel variant × tile instead (see `sweep`). Every timing is guarded (an error is recorded in its place). Prints
one JSON object (and each row on stderr as it is done).
    python bench/matmul.py [--quick] [--batch-sizes 1 8 32] [--tiles] [--models ...] [--sweep SHAPES]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.backends.wgpu.context import GpuContext  # noqa: E402
from engine.backends.wgpu.kernels.linear import (DIAG_KERNELS, F16_KERNELS, KERNELS,  # noqa: E402
                                                 SPLIT_PARTIAL_FLOATS, TILES, GemmShape, Matmul, pack_weight,
                                                 widen_weight)
from engine.backends.wgpu.kernels.linear_f16 import MatmulF16  # noqa: E402
from engine.backends.wgpu.microbench import time_matmul  # noqa: E402
from engine.backends.wgpu.tuning import GemmTuner, round_robin_seconds  # noqa: E402

# (hidden, q_dim, kv_dim, intermediate, vocab) of the model shapes the issue names
MODELS = {
    "SmolLM2-135M": (576, 576, 192, 1536, 49152),
    "Qwen3-0.6B": (1024, 2048, 1024, 3072, 151936),
    "Llama-3.2-1B": (2048, 2048, 512, 8192, 128256),
}
ISSUE_SHAPES = [(4096, 4096, 4096), (4096, 8192, 2048), (4096, 2048, 8192), (4096, 1024, 1024), (512, 3072, 1024)]
SEQ = 512
TARGET_SECONDS = 0.03   # GPU time per timed submit (repeats chosen from a first estimate)


def products(bt: int, hidden: int = 576, q_dim: int = 576, kv: int = 192, mlp: int = 1536, vocab: int = 49152,
             rank: int = 16, vocab_chunk: int = 341) -> dict[str, tuple[GemmShape, bool]]:
    """{name: (shape, B is a frozen weight)} of one training step's distinct products at B·T = bt."""
    chunk = min(bt, vocab_chunk)
    out = {
        "q forward": (GemmShape(bt, q_dim, hidden, trans_b=True), True),
        "k/v forward": (GemmShape(bt, kv, hidden, trans_b=True), True),
        "o forward": (GemmShape(bt, hidden, q_dim, trans_b=True), True),
        "gate/up forward": (GemmShape(bt, mlp, hidden, trans_b=True), True),
        "down forward": (GemmShape(bt, hidden, mlp, trans_b=True), True),
        "q input grad": (GemmShape(bt, hidden, q_dim), True),
        "k/v input grad": (GemmShape(bt, hidden, kv), True),
        "o input grad": (GemmShape(bt, q_dim, hidden), True),
        "gate/up input grad": (GemmShape(bt, hidden, mlp), True),
        "down input grad": (GemmShape(bt, mlp, hidden), True),
        "lora u = x·Aᵀ": (GemmShape(bt, rank, mlp, trans_b=True), False),
        "lora dA (down)": (GemmShape(rank, mlp, bt, trans_a=True), False),
        "lora dB (gate)": (GemmShape(mlp, rank, bt, trans_a=True), False),
        "lm head logits chunk": (GemmShape(chunk, vocab, hidden, trans_b=True), True),
        "lm head d(hidden) chunk": (GemmShape(chunk, hidden, vocab), True),
    }
    seen, unique = set(), {}
    for name, (shape, frozen) in out.items():
        if shape not in seen:
            seen.add(shape)
            unique[name] = (shape, frozen)
    return unique


def operand_sizes(shape: GemmShape) -> tuple[int, int]:
    return shape.M * shape.K, shape.N * shape.K


class Operands:
    """Random A and B (f32, f16, bf16) buffers large enough for every product, bound whole to each one."""

    def __init__(self, ctx, a_floats: int, b_floats: int):
        rng = np.random.default_rng(0)
        self.a = ctx.upload(rng.random(a_floats, np.float32) - 0.5, "bench.a")
        b = rng.random(b_floats, np.float32) - 0.5
        self.b = {"f32": ctx.upload(b, "bench.b"), "f16": ctx.upload(pack_weight(b, "f16"), "bench.b16"),
                  "bf16": ctx.upload(pack_weight(b, "bf16"), "bench.bbf16")}


def time_ours(ctx, ops: Operands, shape: GemmShape, tile, partials, b_format: str = "f32", row_scale=None,
              **kw) -> dict:
    """Our product timed; with `row_scale` (a scratch of M floats) in half-precision math (MatmulF16)."""
    try:
        return _time_ours(ctx, ops, shape, tile, partials, b_format, row_scale, **kw)
    except Exception as exc:  # noqa: BLE001 — one failing variant must not lose the rest of the run
        return {"error": f"{type(exc).__name__}: {exc}"}


def _time_ours(ctx, ops: Operands, shape: GemmShape, tile, partials, b_format, row_scale, **kw) -> dict:
    c = ctx.buffer(4 * shape.M * shape.N, "bench.c")
    if row_scale is not None:
        mm = MatmulF16(ctx, c, ops.a, ops.b[b_format], shape, row_scale, tile=tile, partials=partials,
                       b_format=b_format, **kw)
    else:
        mm = Matmul(ctx, c, ops.a, ops.b[b_format], shape, tile=tile, partials=partials, b_format=b_format, **kw)
    flops = 2.0 * shape.M * shape.N * shape.K
    first = time_matmul(ctx, mm, c, 3) / 3
    repeats = int(min(500, max(3, TARGET_SECONDS / max(first, 1e-6))))
    elapsed = time_matmul(ctx, mm, c, repeats)
    c.destroy()
    return {"tflops": flops * repeats / elapsed / 1e12, "us": 1e6 * elapsed / repeats, "tile": mm.tile,
            "splits": mm.splits, "kernel": mm.kernel.name, "gflops": flops * repeats / elapsed / 1e9}


def torch_timer():
    """f(shape, dtype) -> {tflops, us} with cuBLAS on the same layouts, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")

    def run(shape: GemmShape, dtype) -> dict:
        try:
            return _run(shape, dtype)
        except Exception as exc:  # noqa: BLE001 — one failing product must not lose the run
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _run(shape: GemmShape, dtype) -> dict:
        a = torch.randn((shape.K, shape.M) if shape.trans_a else (shape.M, shape.K), device=dev, dtype=dtype)
        b = torch.randn((shape.N, shape.K) if shape.trans_b else (shape.K, shape.N), device=dev, dtype=dtype)
        a_op = a.t() if shape.trans_a else a
        b_op = b.t() if shape.trans_b else b
        out = torch.empty(shape.M, shape.N, device=dev, dtype=dtype)
        torch.matmul(a_op, b_op, out=out)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        repeats = 3
        for _ in range(2):
            start.record()
            for _ in range(repeats):
                torch.matmul(a_op, b_op, out=out)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            repeats = int(min(500, max(3, TARGET_SECONDS * repeats / max(seconds, 1e-6))))
        start.record()
        for _ in range(repeats):
            torch.matmul(a_op, b_op, out=out)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / repeats
        return {"tflops": 2.0 * shape.M * shape.N * shape.K / seconds / 1e12, "us": 1e6 * seconds}

    return run, torch


def ratio(key: str, row: dict, ours: str) -> None:
    """row[key] = our TFLOP/s over torch fp32's, where both were measured."""
    if "tflops" in row.get(ours, {}) and "tflops" in row.get("torch_fp32", {}):
        row[key] = row[ours]["tflops"] / row["torch_fp32"]["tflops"]


def check_against_numpy(ctx, M: int, N: int, K: int) -> dict:
    """Max error relative to max |C| of ours vs numpy float64 at an odd size, per layout and weight format."""
    rng = np.random.default_rng(1)
    errors = {}
    for name, shape, fmt in [("NT f32", GemmShape(M, N, K, trans_b=True), "f32"),
                             ("NN f32", GemmShape(M, N, K), "f32"), ("TN f32", GemmShape(M, N, K, trans_a=True), "f32"),
                             ("NT f16", GemmShape(M, N, K, trans_b=True), "f16"),
                             ("NN bf16", GemmShape(M, N, K), "bf16")]:
        a = rng.standard_normal((K, M) if shape.trans_a else (M, K)).astype(np.float32)
        b = rng.standard_normal((N, K) if shape.trans_b else (K, N)).astype(np.float32)
        c = ctx.buffer(4 * M * N, "check.c")
        mm = Matmul(ctx, c, ctx.upload(a, "check.a"), ctx.upload(pack_weight(b, fmt), "check.b"), shape, b_format=fmt)
        enc = ctx.encoder()
        mm.encode(enc)
        enc.submit()
        got = ctx.read(c, count=M * N).reshape(M, N)
        bw = widen_weight(b, fmt).astype(np.float64)
        want = (a.T if shape.trans_a else a).astype(np.float64) @ (bw.T if shape.trans_b else bw)
        errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
    if ctx.has_f16:
        # Half-precision math: also the RMS error relative to the RMS of C (linear_f16.wgsl's header: f16
        # operands and 16-product f16 sums, f32 across K).
        for name, shape, fmt in [("NT f16 math", GemmShape(M, N, K, trans_b=True), "f16"),
                                 ("NN bf16 math", GemmShape(M, N, K), "bf16")]:
            a = rng.standard_normal((M, K)).astype(np.float32)
            b = (rng.standard_normal((N, K) if shape.trans_b else (K, N)) * 0.05).astype(np.float32)
            c = ctx.buffer(4 * M * N, "check.c")
            mm = MatmulF16(ctx, c, ctx.upload(a, "check.a"), ctx.upload(pack_weight(b, fmt), "check.b"), shape,
                           ctx.buffer(4 * M, "check.row_scale"), b_format=fmt)
            enc = ctx.encoder()
            mm.encode(enc)
            enc.submit()
            got = ctx.read(c, count=M * N).reshape(M, N)
            bw = widen_weight(b, fmt).astype(np.float64)
            want = a.astype(np.float64) @ (bw.T if shape.trans_b else bw)
            errors[name] = float(np.abs(got - want).max() / np.abs(want).max())
            errors[name + " rms"] = float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))
    return errors


def warm_up(ctx, ops: Operands, seconds: float = 1.0) -> None:
    """Products for about `seconds` first, so the GPU's clocks are up for the first timing (without this the
    first product measured 3-4× slow on the H200: the "pathological 4096³" of issue 16 was this)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time_ours(ctx, ops, GemmShape(4096, 4096, 4096, trans_b=True), None, None)


SWEEP_SHAPES = [GemmShape(4096, 4096, 4096, trans_b=True), GemmShape(4096, 8192, 2048),
                GemmShape(4096, 1024, 1024, trans_b=True), GemmShape(512, 3072, 1024, trans_b=True),
                GemmShape(16384, 576, 1536, trans_b=True), GemmShape(4096, 576, 1536),
                GemmShape(512, 576, 576, trans_b=True), GemmShape(16, 1536, 16384, trans_a=True),
                GemmShape(341, 1024, 151936), GemmShape(4096, 16, 1536, trans_b=True)]


def sweep(ctx, count: int, rounds: int = 3) -> list:
    """Each kernel variant (BK, DOUBLE, PREFETCH, FRAG, warp 8×4) × tile on representative shapes, the f16-math
    kernels, and the diagnostic kernels (no global loads; no staging: what the inner loop alone reaches).

    Every variant of a shape is compiled first, then, after a warm-up, all are timed round-robin, best of `rounds`
    (engine.backends.wgpu.tuning.round_robin_seconds: timing each right after its compile measured 2-5× slow at
    random, which made the previous sweeps' small differences noise)."""
    ops = Operands(ctx, max(s.M * s.K for s in SWEEP_SHAPES), max(s.N * s.K for s in SWEEP_SHAPES))
    row_scale = ctx.buffer(4 * max(s.M for s in SWEEP_SHAPES), "bench.row_scale")
    rows = []
    for shape in SWEEP_SHAPES[:count]:
        row = {"M": shape.M, "N": shape.N, "K": shape.K, "layout": ("T" if shape.trans_a else "N") +
               ("T" if shape.trans_b else "N")}
        c = ctx.buffer(4 * shape.M * shape.N, "bench.c")
        variants = {}
        for kernel in KERNELS + DIAG_KERNELS:
            for tile in TILES:
                variants[f"{kernel.name} {tile[0]}x{tile[1]}"] = lambda k=kernel, t=tile: Matmul(
                    ctx, c, ops.a, ops.b["f32"], shape, tile=t, kernel=k)
        if ctx.has_f16 and not shape.trans_a:
            for kernel in F16_KERNELS:
                for tile in TILES:
                    variants[f"f16math {kernel.name} {tile[0]}x{tile[1]}"] = lambda k=kernel, t=tile: MatmulF16(
                        ctx, c, ops.a, ops.b["bf16"], shape, row_scale, tile=t, b_format="bf16", kernel=k)
        built = {}
        for name, build in variants.items():
            try:
                built[name] = build()
            except Exception as exc:  # noqa: BLE001 — one failing variant must not lose the rest of the run
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
        flops = 2.0 * shape.M * shape.N * shape.K
        first = next(iter(built.values()))
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            time_matmul(ctx, first, c, 8)
        best = round_robin_seconds(built, lambda mm, n: time_matmul(ctx, mm, c, n) / n, TARGET_SECONDS, rounds,
                                   (3, 200))
        for name, seconds in best.items():
            row[name] = {"tflops": flops / seconds / 1e12, "us": 1e6 * seconds}
        c.destroy()
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=16, SmolLM2 shapes with vocabulary 2048 (smoke test)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="SmolLM2-135M batch sizes")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="model shapes besides the issue's")
    parser.add_argument("--tiles", action="store_true", help="also time each tile forced (no split)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--sweep", type=int, default=0, metavar="SHAPES",
                        help="kernel variants × tiles on the first SHAPES sweep shapes, then exit")
    args = parser.parse_args(argv)
    seq = 16 if args.quick else SEQ
    ctx = GpuContext.create()
    partials = ctx.buffer(4 * SPLIT_PARTIAL_FLOATS, "partials")
    import wgpu
    torch_run, torch = (None, None) if args.no_torch else torch_timer()
    report = {"benchmark": "matmul", "seq_len": seq, "target_seconds_per_timing": TARGET_SECONDS,
              "machine": {"adapter": ctx.label, "backend": ctx.adapter.info.get("backend_type"),
                          "driver": ctx.adapter.info.get("description", ""), "platform": platform.platform(),
                          "wgpu": wgpu.__version__, "torch": torch.__version__ if torch else None,
                          "torch_gpu": torch.cuda.get_device_name(0) if torch else None},
              "results": []}
    if args.sweep:   # (sweep warms the GPU up per shape, after compiling its variants)
        report["sweep"] = sweep(ctx, args.sweep)
        print(json.dumps(report, indent=2))
        return 0
    jobs = []   # (group, batch·seq, name, shape, B frozen)
    if args.quick:
        for name, (shape, frozen) in products(args.batch_sizes[0] * seq, vocab=2048).items():
            jobs.append(("SmolLM2-135M", args.batch_sizes[0] * seq, name, shape, frozen))
        args.tiles = True
    else:
        for M, N, K in ISSUE_SHAPES:
            jobs.append(("issue 16", M, f"{M}x{N}x{K}", GemmShape(M, N, K, trans_b=True), True))
        for model in args.models:
            hidden, q_dim, kv, mlp, vocab = MODELS[model]
            bts = [b * seq for b in args.batch_sizes] if model == "SmolLM2-135M" else [512, 4096]
            for bt in bts:
                for name, (shape, frozen) in products(bt, hidden, q_dim, kv, mlp, vocab).items():
                    jobs.append((model, bt, name, shape, frozen))
    # B is bound whole: a product whose B exceeds one binding is cut to the largest N (or K) that fits.
    max_b = ctx.max_binding_bytes // 4
    fitted = []
    for group, bt, name, shape, frozen in jobs:
        if shape.N * shape.K > max_b:
            if shape.trans_b:
                shape = GemmShape(shape.M, max_b // shape.K, shape.K, trans_b=True)
            else:
                shape = GemmShape(shape.M, shape.N, max_b // shape.N, trans_a=shape.trans_a)
            name += " (cut to one binding)"
        fitted.append((group, bt, name, shape, frozen))
    ops = Operands(ctx, max(operand_sizes(s)[0] for *_, s, _ in fitted),
                   max(operand_sizes(s)[1] for *_, s, _ in fitted))
    row_scale = ctx.buffer(4 * max(s.M for *_, s, _ in fitted), "bench.row_scale") if ctx.has_f16 else None
    report["checks_max_rel_error"] = check_against_numpy(ctx, *((37, 53, 129) if args.quick else (1031, 1029, 1027)))
    if not args.quick:
        warm_up(ctx, ops)
        fitted += [(f"{g} (again, last)", bt, n, s, f) for g, bt, n, s, f in fitted[:len(ISSUE_SHAPES)]]
    # The autotune (engine.backends.wgpu.tuning) with a cache of its own, so every run measures afresh.
    tuner = GemmTuner.for_context(ctx, Path(tempfile.mkdtemp()) / "gemm-tuning.json")
    report["machine"]["tuned"] = tuner is not None
    start = time.perf_counter()
    for group, bt, name, shape, frozen in fitted:
        row = {"group": group, "tokens": bt, "product": name, "M": shape.M, "N": shape.N, "K": shape.K,
               "layout": ("T" if shape.trans_a else "N") + ("T" if shape.trans_b else "N")}
        row["auto"] = time_ours(ctx, ops, shape, None, partials)
        if tuner is not None:
            ctx.gemm_tuner = tuner          # "tuned": the tile the autotune measures for this product
            row["tuned"] = time_ours(ctx, ops, shape, None, partials)
            if row_scale is not None and frozen and not shape.trans_a:
                row["tuned_f16math"] = time_ours(ctx, ops, shape, None, partials, "f16", row_scale)
            ctx.gemm_tuner = None
        if frozen:
            for fmt in ("f16", "bf16"):
                row[f"auto_{fmt}"] = time_ours(ctx, ops, shape, None, partials, fmt)
            if row_scale is not None and not shape.trans_a:
                row["auto_f16math"] = time_ours(ctx, ops, shape, None, partials, "f16", row_scale)
        if args.tiles:
            for rows, cols in TILES:
                row[f"{rows}x{cols}"] = time_ours(ctx, ops, shape, (rows, cols), None)
                if row_scale is not None and frozen and not shape.trans_a:
                    row[f"f16math {rows}x{cols}"] = time_ours(ctx, ops, shape, (rows, cols), None, "f16", row_scale)
            if group == "issue 16":
                row["auto_group_m1"] = time_ours(ctx, ops, shape, None, partials, group_m=1)
        if torch_run:
            row["torch_fp32"] = torch_run(shape, torch.float32)
            row["torch_bf16"] = torch_run(shape, torch.bfloat16)
            ratio("ratio_vs_torch_fp32", row, "auto")
            ratio("ratio_tuned_vs_torch_fp32", row, "tuned")
            ratio("ratio_tuned_f16math_vs_torch_fp32", row, "tuned_f16math")
            if frozen:
                ratio("ratio_f16_vs_torch_fp32", row, "auto_f16")
                ratio("ratio_f16math_vs_torch_fp32", row, "auto_f16math")
        report["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    report["seconds"] = time.perf_counter() - start
    if torch_run:
        for key in ("ratio_vs_torch_fp32", "ratio_f16math_vs_torch_fp32", "ratio_tuned_vs_torch_fp32",
                    "ratio_tuned_f16math_vs_torch_fp32"):
            ratios = [r[key] for r in report["results"] if key in r]
            if ratios:
                report[f"min_{key}"] = min(ratios)
                report[f"median_{key}"] = float(np.median(ratios))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
