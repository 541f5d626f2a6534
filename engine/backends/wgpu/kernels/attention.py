"""Python twin of shaders/attention.wgsl: causal GQA attention, flash-attention style forward and backward,
optionally over a sliding window (a query t sees the keys t − window < kv <= t) and with soft-capped scores
(cap·tanh(s / cap), Gemma 2).

Layouts (f32): q, out, dout, dq [B, T, NH, HD]; k, v, dk, dv [B, T, NKV, HD]; lse [B, NH, T] (saved by the
forward for the backward). The backward is flash-attention-2's: P is recomputed from lse, D = rowsum(dout*out)
goes to a scratch buffer this class owns, then one kernel writes dq (walking key tiles) and one writes dk and
dv (walking query tiles). With GQA the dk/dv kernel runs per query head into scratch [B, T, NH, HD] x 2 and a
last kernel sums each group's heads in a fixed order: deterministic, overwritten, no atomics, and NH/NKV times
the workgroups of walking a whole group in one (measured: see bench/attention.py).
"""
from __future__ import annotations

import math


from engine.backends.wgpu.context import GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d
from engine.backends.wgpu.uniforms import upload_uniform

ROWS = 16                 # register rows per workgroup (shaders/attention.wgsl ROWS), at most 256 / TPR
MAX_INVOCATIONS = 256     # WebGPU's guaranteed minimum of max-compute-invocations-per-workgroup
# Key/query rows per tile. Measured on an H100 (bench/attention.py, T 2048, HD 64/128/256): 6 beats 2, 4, 8,
# 14, 19, 29 and 58 (fwd+bwd 1.3-3.5x faster than 58); more rows hold more workgroup memory per thread, so
# fewer workgroups stay resident to hide memory latency, and fewer rows mean more barriers per key.
MAX_TILE_ROWS = 6
PORTABLE_WORKGROUP_BYTES = 16384   # WebGPU's guaranteed minimum of max-compute-workgroup-storage-size
DSUM_WORKGROUP = 64

# Bindings each entry point uses (shaders/attention.wgsl): 0 params, 1 q, 2 k, 3 v, 4 out, 5 lse, 6 dout,
# 7 dsum, 8 dq, 9 dk, 10 dv, 11 dk_heads, 12 dv_heads.
BINDINGS = {
    "attention_forward": (0, 1, 2, 3, 4, 5),
    "attention_backward_dsum": (0, 4, 6, 7),
    "attention_backward_dq": (0, 1, 2, 3, 5, 6, 7, 8),
    "attention_backward_dkdv": (0, 1, 2, 3, 5, 6, 7, 9, 10),
    "attention_backward_dkdv_heads": (0, 1, 2, 3, 5, 6, 7, 11, 12),
    "attention_backward_dkdv_sum": (0, 9, 10, 11, 12),
}
ELEMENTWISE = ("attention_backward_dsum", "attention_backward_dkdv_sum")   # 64-wide, need only HD4


def workgroup_bytes(hd4: int, tpr: int, tile_rows: int, rows: int = ROWS, capped: bool = False) -> int:
    """Workgroup memory of shaders/attention.wgsl: tile_a + tile_b + red + prob + tile_lse + tile_d, and with
    soft-capping (`capped`) slope."""
    return tile_rows * (2 * 16 * hd4 + 4 * rows * tpr + 4 * rows * (1 + capped) + 2 * 4)


def tiling(head_dim: int, budget: int = PORTABLE_WORKGROUP_BYTES, max_tile_rows: int = MAX_TILE_ROWS,
           register_rows: int = ROWS, capped: bool = False) -> dict[str, int]:
    """Override constants for a head size: chunks per row, threads per row, rows, tile rows, workgroup size.

    Tile rows: max_tile_rows, or fewer if they would not fit `budget` bytes of workgroup memory.
    """
    hd4 = head_dim // 4
    tpr = -(-hd4 // 4)
    rows = max(1, min(register_rows, MAX_INVOCATIONS // tpr))
    # Each thread prefetches at most two vec4 of a tile row set (shaders/attention.wgsl Fetch).
    tile_rows = max(1, min(max_tile_rows, budget // workgroup_bytes(hd4, tpr, 1, rows, capped),
                           2 * rows * tpr // hd4))
    return {"HD4": hd4, "TPR": tpr, "ROWS": rows, "BT": tile_rows, "WG": rows * tpr}


class Attention:
    """Scaled (by `scale`, default 1/sqrt(HD)) causal attention with n_heads query heads over n_kv_heads shared KV heads.

    `encode_forward` writes out and lse; `encode_backward` writes (overwrites) dq, dk, dv, with dk/dv summed
    over the query heads that share each KV head.
    """

    def __init__(self, ctx: GpuContext, B: int, T: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 q, k, v, out, lse, dout, dq, dk, dv, label: str = "attention",
                 workgroup_budget: int | None = None, max_tile_rows: int = MAX_TILE_ROWS,
                 register_rows: int = ROWS, dsum=None, dk_heads=None, dv_heads=None, scale: float | None = None,
                 window: int | None = None, softcap: float | None = None):
        """`dsum` [B, NH, T] and, with GQA, `dk_heads`, `dv_heads` [B, T, NH, HD]: the backward's scratch, which
        it writes before it reads, so the layers of a model can share one set; allocated here when not given.
        `window`: a sliding window in keys (None: plain causal). `softcap`: the scores' soft cap (None: none)."""
        if head_dim % 4 or not 4 <= head_dim <= 256:
            raise ValueError(f"attention needs head_dim a multiple of 4 in [4, 256], got {head_dim}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if min(B, T) < 1:
            raise ValueError(f"attention needs B >= 1 and T >= 1, got B={B}, T={T}")
        if window is not None and window < 1:
            raise ValueError(f"attention's sliding window must be at least 1 key, got {window}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"attention's soft cap must be positive, got {softcap}")
        q_bytes, kv_bytes, stat_bytes = 4 * B * T * n_heads * head_dim, 4 * B * T * n_kv_heads * head_dim, \
            4 * B * n_heads * T
        for name, buf, need in (("q", q, q_bytes), ("k", k, kv_bytes), ("v", v, kv_bytes), ("out", out, q_bytes),
                                ("lse", lse, stat_bytes), ("dout", dout, q_bytes), ("dq", dq, q_bytes),
                                ("dk", dk, kv_bytes), ("dv", dv, kv_bytes), ("dsum", dsum, stat_bytes),
                                ("dk_heads", dk_heads, q_bytes), ("dv_heads", dv_heads, q_bytes)):
            if buf is not None and buf.size < need:
                raise ValueError(f"attention buffer {name} ({buf.label!r}) holds {buf.size} bytes; "
                                 f"[B={B}, T={T}, NH={n_heads}, NKV={n_kv_heads}, HD={head_dim}] needs {need}")
        self.ctx, self.label = ctx, label
        self.shape = (B, T, n_heads, n_kv_heads, head_dim)
        # The adapter's limit (16 KiB at least); only HD >= 224 needs more than 16 KiB for 6-row tiles.
        budget = int(ctx.device.limits["max-compute-workgroup-storage-size"])
        if workgroup_budget is not None:
            budget = min(budget, workgroup_budget)
        self.constants = tiling(head_dim, budget, max_tile_rows, register_rows, capped=softcap is not None)
        # A window of T keys or more cuts nothing: such a layer runs the plain causal pipeline (WINDOW 0), as
        # every layer without a window does, at no cost from the window's checks.
        self.window = window if window is not None and window < T else None
        self.constants["WINDOW"] = self.window or 0
        self.constants["SOFTCAP"] = softcap or 0.0
        self.constants["SLOPES"] = self.constants["ROWS"] * self.constants["BT"] if softcap else 1
        blocks = -(-T // self.constants["ROWS"])
        if max(blocks, n_heads, B) > ctx.max_workgroups:
            raise ValueError(f"attention grid ({blocks}, {n_heads}, {B}) exceeds {ctx.max_workgroups} per dimension")
        ratio = n_heads // n_kv_heads
        # GQA: dk/dv are computed per query head (ratio times the workgroups) into scratch, then summed.
        self.backward_entries = ("attention_backward_dsum", "attention_backward_dq") + (
            ("attention_backward_dkdv_heads", "attention_backward_dkdv_sum") if ratio > 1
            else ("attention_backward_dkdv",))
        # [B, NH, T] rowsum(dout * out)
        self.dsum = dsum if dsum is not None else ctx.buffer(stat_bytes, f"{label}.dsum")
        dsum_x, dsum_y, dsum_stride = grid_1d(ctx, B * n_heads * T, DSUM_WORKGROUP)
        sum_x, sum_y, sum_stride = grid_1d(ctx, B * T * n_kv_heads * head_dim // 4, DSUM_WORKGROUP)
        self.params = upload_uniform(ctx, "attention", "Params", f"{label}.params", batch=B, seq_len=T,
                                     n_heads=n_heads, n_kv=n_kv_heads, ratio=ratio, scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
                                     dsum_stride=dsum_stride, sum_stride=sum_stride)
        resources = {0: self.params, 1: q, 2: k, 3: v, 4: out, 5: lse, 6: dout, 7: self.dsum, 8: dq, 9: dk, 10: dv}
        if ratio > 1:   # [B, T, NH, HD] each
            resources[11] = dk_heads if dk_heads is not None else ctx.buffer(q_bytes, f"{label}.dk_heads")
            resources[12] = dv_heads if dv_heads is not None else ctx.buffer(q_bytes, f"{label}.dv_heads")
        self._kernels = {}
        for entry in ("attention_forward",) + self.backward_entries:
            constants = {"HD4": self.constants["HD4"]} if entry in ELEMENTWISE else self.constants
            pipeline = ctx.pipeline("attention", entry, constants)
            group = ctx.bind_group(pipeline, {i: resources[i] for i in BINDINGS[entry]}, f"{label}.{entry}")
            self._kernels[entry] = (pipeline, group)
        self._grids = {
            "attention_forward": (blocks, n_heads, B),
            "attention_backward_dsum": (dsum_x, dsum_y, 1),
            "attention_backward_dq": (blocks, n_heads, B),
            "attention_backward_dkdv": (blocks, n_kv_heads, B),
            "attention_backward_dkdv_heads": (blocks, n_heads, B),
            "attention_backward_dkdv_sum": (sum_x, sum_y, 1),
        }

    def encode_entry(self, enc: StepEncoder, entry: str) -> None:
        pipeline, group = self._kernels[entry]
        enc.dispatch(pipeline, group, *self._grids[entry])

    def encode_forward(self, enc: StepEncoder) -> None:
        self.encode_entry(enc, "attention_forward")

    def encode_backward(self, enc: StepEncoder) -> None:
        for entry in self.backward_entries:
            self.encode_entry(enc, entry)
