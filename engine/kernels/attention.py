"""Python twin of shaders/attention.wgsl: causal GQA attention, flash-attention style forward and backward.

Layouts (f32): q, out, dout, dq [B, T, NH, HD]; k, v, dk, dv [B, T, NKV, HD]; lse [B, NH, T] (saved by the
forward for the backward). The backward is flash-attention-2's: P is recomputed from lse, D = rowsum(dout*out)
goes to a scratch buffer this class owns, then one kernel writes dq (walking key tiles) and one writes dk and
dv (walking the query tiles of every query head of the KV group), so nothing is accumulated with atomics.
"""
from __future__ import annotations

import math

import numpy as np

from engine.gpu import UNIFORM, GpuContext, StepEncoder
from engine.kernels.binding import bind_numbered

ROWS = 16                 # register rows per workgroup (shaders/attention.wgsl ROWS)
TILE_VEC4 = 256           # capacity of tile_a / tile_b in vec4
RED_FLOATS = 1024         # capacity of the partial-dot scratch
MAX_TILE_ROWS = 32        # capacity of tile_lse / tile_d, and prob = ROWS * 32
DSUM_WORKGROUP = 64

# Bindings each entry point uses (shaders/attention.wgsl): 0 params, 1 q, 2 k, 3 v, 4 out, 5 lse, 6 dout,
# 7 dsum, 8 dq, 9 dk, 10 dv.
BINDINGS = {
    "attention_forward": (0, 1, 2, 3, 4, 5),
    "attention_backward_dsum": (0, 4, 6, 7),
    "attention_backward_dq": (0, 1, 2, 3, 5, 6, 7, 8),
    "attention_backward_dkdv": (0, 1, 2, 3, 5, 6, 7, 9, 10),
}


def tiling(head_dim: int) -> dict[str, int]:
    """Override constants for a head size: chunks per row, threads per row, tile rows, workgroup size."""
    hd4 = head_dim // 4
    tpr = -(-hd4 // 4)
    tile_rows = min(MAX_TILE_ROWS, TILE_VEC4 // hd4, RED_FLOATS // (ROWS * tpr))
    return {"HD4": hd4, "TPR": tpr, "BT": tile_rows, "WG": ROWS * tpr}


class Attention:
    """Scaled (1/sqrt(HD)) causal attention with n_heads query heads over n_kv_heads shared KV heads.

    `encode_forward` writes out and lse; `encode_backward` writes (overwrites) dq, dk, dv, with dk/dv summed
    over the query heads that share each KV head.
    """

    def __init__(self, ctx: GpuContext, B: int, T: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 q, k, v, out, lse, dout, dq, dk, dv, label: str = "attention"):
        if head_dim % 4 or not 4 <= head_dim <= 256:
            raise ValueError(f"attention needs head_dim a multiple of 4 in [4, 256], got {head_dim}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if min(B, T) < 1:
            raise ValueError(f"attention needs B >= 1 and T >= 1, got B={B}, T={T}")
        q_bytes, kv_bytes, stat_bytes = 4 * B * T * n_heads * head_dim, 4 * B * T * n_kv_heads * head_dim, \
            4 * B * n_heads * T
        for name, buf, need in (("q", q, q_bytes), ("k", k, kv_bytes), ("v", v, kv_bytes), ("out", out, q_bytes),
                                ("lse", lse, stat_bytes), ("dout", dout, q_bytes), ("dq", dq, q_bytes),
                                ("dk", dk, kv_bytes), ("dv", dv, kv_bytes)):
            if buf.size < need:
                raise ValueError(f"attention buffer {name} ({buf.label!r}) holds {buf.size} bytes; "
                                 f"[B={B}, T={T}, NH={n_heads}, NKV={n_kv_heads}, HD={head_dim}] needs {need}")
        blocks = -(-T // ROWS)
        if max(blocks, n_heads, B) > ctx.max_workgroups:
            raise ValueError(f"attention grid ({blocks}, {n_heads}, {B}) exceeds {ctx.max_workgroups} per dimension")
        self.ctx, self.label = ctx, label
        self.shape = (B, T, n_heads, n_kv_heads, head_dim)
        self.constants = tiling(head_dim)
        self.dsum = ctx.buffer(stat_bytes, f"{label}.dsum")       # [B, NH, T] rowsum(dout * out)
        self.params = ctx.upload(self.pack_params(B, T, n_heads, n_kv_heads, head_dim), f"{label}.params", UNIFORM)
        resources = {0: self.params, 1: q, 2: k, 3: v, 4: out, 5: lse, 6: dout, 7: self.dsum, 8: dq, 9: dk, 10: dv}
        self._kernels = {}
        for entry, bindings in BINDINGS.items():
            constants = {"HD4": self.constants["HD4"]} if entry == "attention_backward_dsum" else self.constants
            pipeline = ctx.pipeline("attention", entry, constants)
            group = bind_numbered(ctx, pipeline, {i: resources[i] for i in bindings}, f"{label}.{entry}")
            self._kernels[entry] = (pipeline, group)
        self._grids = {
            "attention_forward": (blocks, n_heads, B),
            "attention_backward_dsum": (-(-B * n_heads * T // DSUM_WORKGROUP), 1, 1),
            "attention_backward_dq": (blocks, n_heads, B),
            "attention_backward_dkdv": (blocks, n_kv_heads, B),
        }

    @staticmethod
    def pack_params(B: int, T: int, n_heads: int, n_kv_heads: int, head_dim: int) -> np.ndarray:
        """The Params uniform: 6 u32/f32 fields padded to 32 bytes (WGSL struct alignment 4, size 32)."""
        raw = np.zeros(8, np.uint32)
        raw[:5] = (B, T, n_heads, n_kv_heads, n_heads // n_kv_heads)
        raw[5:6] = np.array([1.0 / math.sqrt(head_dim)], np.float32).view(np.uint32)
        return raw

    def _dispatch(self, enc: StepEncoder, entry: str) -> None:
        pipeline, group = self._kernels[entry]
        enc.dispatch(pipeline, group, *self._grids[entry])

    def encode_forward(self, enc: StepEncoder) -> None:
        self._dispatch(enc, "attention_forward")

    def encode_backward(self, enc: StepEncoder) -> None:
        for entry in ("attention_backward_dsum", "attention_backward_dq", "attention_backward_dkdv"):
            self._dispatch(enc, entry)
