"""Python twin of shaders/linear.wgsl: the tiled GEMM every matrix product of the engine goes through.

`Matmul` binds one product C = alpha·op(A)·op(B) (+ bias) (+ beta·C) to its buffers once; `Linear` is the frozen
projection y = x·Wᵀ + b with its input gradient dx = dy·W (frozen weights need no weight gradient).
A buffer argument is a wgpu buffer or a (buffer, byte offset, byte size) sub-range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.gpu import UNIFORM, GpuContext, StepEncoder

TILE_M = 64   # rows of C per workgroup (BM in the shader)
TILE_N = 64   # columns of C per workgroup (BN)


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


def pack_gemm_params(shape: GemmShape, alpha: float, beta: float, has_bias: bool) -> bytes:
    """The shader's Params struct: 12 u32 then 4 f32 (64 bytes, WGSL uniform layout)."""
    lda, ldb, ldc = shape.strides()
    ints = np.array([shape.M, shape.N, shape.K, lda, ldb, ldc, shape.a_off, shape.b_off, shape.c_off,
                     int(has_bias), 0, 0], np.uint32)
    floats = np.array([alpha, beta, 0, 0], np.float32)
    return ints.tobytes() + floats.tobytes()


class Matmul:
    """One bound GEMM dispatch: c = alpha·op(a)·op(b) + bias + beta·c."""

    def __init__(self, ctx: GpuContext, c, a, b, shape: GemmShape, alpha: float = 1.0, beta: float = 0.0,
                 bias=None, label: str = "matmul"):
        self.ctx = ctx
        self.shape = shape
        self.pipeline = ctx.pipeline("linear", "matmul", {"TRANS_A": int(shape.trans_a),
                                                          "TRANS_B": int(shape.trans_b)})
        params = np.frombuffer(pack_gemm_params(shape, alpha, beta, bias is not None), np.uint8)
        self.params = ctx.upload(params, f"{label}.params", UNIFORM)
        # The layout always has a bias binding; without a bias, b stands in (read-only too, and never read).
        bias = bias if bias is not None else b
        self.bind_group = ctx.bind_group(self.pipeline, [c, a, b, bias, self.params], label)
        self.groups = (-(-shape.N // TILE_N), -(-shape.M // TILE_M))

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.pipeline, self.bind_group, *self.groups)


class Linear:
    """Frozen projection out = x·Wᵀ + b over M rows; backward writes (or with accumulate, adds) dx = dy·W.

    x [M, in], W [out, in], b [out] or None, out [M, out]; dy [M, out], dx [M, in].
    """

    def __init__(self, ctx: GpuContext, out, x, weight, bias, M: int, in_features: int, out_features: int,
                 dy=None, dx=None, accumulate_dx: bool = False, label: str = "linear"):
        self.forward = Matmul(ctx, out, x, weight, GemmShape(M, out_features, in_features, trans_b=True),
                              bias=bias, label=f"{label}.fwd")
        self.backward = None
        if dy is not None and dx is not None:
            self.backward = Matmul(ctx, dx, dy, weight, GemmShape(M, in_features, out_features),
                                   beta=1.0 if accumulate_dx else 0.0, label=f"{label}.bwd")

    def encode_forward(self, enc: StepEncoder) -> None:
        self.forward.encode(enc)

    def encode_backward(self, enc: StepEncoder) -> None:
        self.backward.encode(enc)
