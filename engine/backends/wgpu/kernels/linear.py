"""Python twin of shaders/linear.wgsl: the tiled GEMM every matrix product of the engine goes through.

`Matmul` binds one product C = alpha·op(A)·op(B) (+ bias) (+ beta·C) to its buffers once; `Linear` is the frozen
projection y = x·Wᵀ + b with its input gradient dx = dy·W (frozen weights need no weight gradient).
A buffer argument is a wgpu buffer or a (buffer, byte offset, byte size) sub-range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.backends.wgpu.context import UNIFORM, GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d

TILE_M = 64   # rows of C per workgroup (BM in the shader)
TILE_N = 64   # columns of C per workgroup (BN)
TILE_K = 16   # K step through workgroup memory (BK)
SPLIT_TARGET_WORKGROUPS = 256   # split K until about this many workgroups run (a large GPU's worth)
SPLIT_MIN_K = 128               # never give a split less K than this
SPLIT_PARTIAL_FLOATS = 1 << 22  # 16 MiB of partial products, shared by every product of a backend
TILES = ((128, 128), (128, 64), (TILE_M, TILE_N))   # (rows, columns) of C per workgroup, largest first
WIDE_MIN_WORKGROUPS = 512       # a larger tile only where it still leaves this many workgroups (a large GPU busy)


@dataclass(frozen=True)
class GemmShape:
    """C[M, N] += A[M, K]·B[K, N] with row strides and element offsets (defaults: dense, offset 0)."""
    M: int
    N: int
    K: int
    trans_a: bool = False   # A stored [K, M]
    trans_b: bool = False   # B stored [N, K]
    lda: int = 0            # 0: the dense stride (K, or M when transposed)
    ldb: int = 0
    ldc: int = 0
    a_off: int = 0
    b_off: int = 0
    c_off: int = 0

    def __post_init__(self):
        if min(self.M, self.N, self.K) < 1:
            raise ValueError(f"matmul sizes must be positive, got M={self.M} N={self.N} K={self.K}")

    def strides(self) -> tuple[int, int, int]:
        lda = self.lda or (self.M if self.trans_a else self.K)
        ldb = self.ldb or (self.K if self.trans_b else self.N)
        return lda, ldb, self.ldc or self.N


def split_k(shape: GemmShape, partial_floats: int) -> int:
    """How many K slices a product gets: 1 unless its tiles are too few to fill a GPU and K is long."""
    tiles = -(-shape.N // TILE_N) * -(-shape.M // TILE_M)
    splits = min(-(-SPLIT_TARGET_WORKGROUPS // tiles), shape.K // SPLIT_MIN_K,
                 partial_floats // (shape.M * shape.N))
    return max(1, splits)


def choose_tile(shape: GemmShape) -> tuple[int, int]:
    """The largest tile that the product fills and that still leaves WIDE_MIN_WORKGROUPS workgroups."""
    for rows, cols in TILES[:-1]:
        if shape.M >= rows and shape.N >= cols and \
                -(-shape.M // rows) * -(-shape.N // cols) >= WIDE_MIN_WORKGROUPS:
            return rows, cols
    return TILES[-1]


def pack_gemm_params(shape: GemmShape, alpha: float, beta: float, has_bias: bool, k_chunk: int = 0,
                     splits: int = 1, row_stride: int = 0) -> bytes:
    """The shader's Params struct: 13 u32, alpha, beta, padding (64 bytes, WGSL uniform layout)."""
    lda, ldb, ldc = shape.strides()
    ints = np.array([shape.M, shape.N, shape.K, lda, ldb, ldc, shape.a_off, shape.b_off, shape.c_off,
                     int(has_bias), k_chunk or shape.K, splits, row_stride], np.uint32)
    return ints.tobytes() + np.array([alpha, beta], np.float32).tobytes() + bytes(4)


class Matmul:
    """One bound GEMM: c = alpha·op(a)·op(b) + bias + beta·c.

    Given `partials` (a scratch shared by many products), a product with few tiles and a long K is split over
    K (split_k, never needing more floats than `partials` holds) and finished by a reduction dispatch.
    """

    def __init__(self, ctx: GpuContext, c, a, b, shape: GemmShape, alpha: float = 1.0, beta: float = 0.0,
                 bias=None, partials=None, tile: tuple[int, int] | None = None, label: str = "matmul"):
        self.ctx = ctx
        self.shape = shape
        self.splits = split_k(shape, partials.size // 4) if partials is not None else 1
        self.tile = tile or choose_tile(shape) if self.splits == 1 else (TILE_M, TILE_N)
        if self.tile not in TILES:
            raise ValueError(f"matmul tile {tile} is not one of {TILES}")
        k_chunk = -(-(-(-shape.K // self.splits)) // TILE_K) * TILE_K
        self.splits = -(-shape.K // k_chunk)
        reduce_groups = grid_1d(ctx, shape.M * shape.N)
        self.pipeline = ctx.pipeline("linear", "matmul", {
            "TRANS_A": int(shape.trans_a), "TRANS_B": int(shape.trans_b), "WIDE": int(self.tile[0] == 128),
            "WIDE_N": int(self.tile[1] == 128)})
        params = pack_gemm_params(shape, alpha, beta, bias is not None, k_chunk, self.splits, reduce_groups[2])
        self.params = ctx.upload(np.frombuffer(params, np.uint8), f"{label}.params", UNIFORM)
        # The layout always has a bias binding; without a bias, b stands in (read-only too, and never read).
        bias = bias if bias is not None else b
        self.groups = (-(-shape.N // self.tile[1]), -(-shape.M // self.tile[0]), self.splits)
        self.reduce = None
        if self.splits == 1:
            self.bind_group = ctx.bind_group(self.pipeline, {0: c, 1: a, 2: b, 3: bias, 4: self.params}, label)
        else:
            self.bind_group = ctx.bind_group(self.pipeline, {0: partials, 1: a, 2: b, 3: bias, 4: self.params}, label)
            self.reduce = ctx.pipeline("linear", "matmul_reduce")
            self.reduce_bg = ctx.bind_group(self.reduce, {0: c, 1: partials, 3: bias, 4: self.params}, f"{label}.reduce")
            self.reduce_groups = reduce_groups[:2]

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, *self.groups)
        if self.reduce is not None:
            enc.dispatch(self.reduce, self.reduce_bg, *self.reduce_groups)


class Linear:
    """Frozen projection out = x·Wᵀ + b over M rows; backward writes (or with accumulate, adds) dx = dy·W.

    x [M, in], W [out, in], b [out] or None, out [M, out]; dy [M, out], dx [M, in]. With `partials`, products
    of few rows (small batches) are split over K to keep a large GPU busy.
    """

    def __init__(self, ctx: GpuContext, out, x, weight, bias, M: int, in_features: int, out_features: int,
                 dy=None, dx=None, accumulate_dx: bool = False, partials=None, label: str = "linear"):
        self.forward = Matmul(ctx, out, x, weight, GemmShape(M, out_features, in_features, trans_b=True),
                              bias=bias, partials=partials, label=f"{label}.fwd")
        self.backward = None
        if dy is not None and dx is not None:
            self.backward = Matmul(ctx, dx, dy, weight, GemmShape(M, in_features, out_features),
                                   beta=1.0 if accumulate_dx else 0.0, partials=partials, label=f"{label}.bwd")

    def encode_forward(self, enc: StepEncoder) -> None:
        self.forward.encode(enc)

    def encode_backward(self, enc: StepEncoder) -> None:
        self.backward.encode(enc)
