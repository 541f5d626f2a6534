"""Python twin of shaders/linear_f16.wgsl: the half-precision-math GEMM of the frozen-weight products.

`MatmulF16` binds one product C = alpha·A·op(B) (+ bias) (+ beta·C) with A f32 [M, K] (never transposed: the
forward's x and the input gradient's dy) and B a frozen weight held f16 or bf16; its operands are rounded to
f16 and multiplied in f16 within a K step of 16, accumulated in f32 across K (the shader's header). Each
encode first computes the power-of-two scale of every row of A (the `row_scales` entry point, into a shared
[rows] scratch), so A's range never over- or underflows f16.

When it is safe: `f16_math_ok` — the weight is held f16 or bf16 and max |w| <= F16_WEIGHT_LIMIT, which keeps a
K step's f16 partial sum below f16's largest value (16 products of |a| < 256 and |w| <= 15: < 61440). A bf16
weight beyond the limit (bf16 reaches 3e38) is refused here and computed by the f32 GEMM instead, never
silently overflowed. The adapter must have "shader-f16" (GpuContext.has_f16).
"""
from __future__ import annotations

import numpy as np

from engine.backends.wgpu.context import UNIFORM, GpuContext, StepEncoder
from engine.backends.wgpu.kernels.grids import grid_1d, grid_rows
from engine.backends.wgpu.kernels.linear import (
    GROUP_M,
    GemmKernel,
    GemmShape,
    Linear,
    SplitKReduce,
    _vec_binding,
    gemm_plan,
    measured_plan,
    pack_gemm_params,
    tuned_plan,
)
from engine.model.weight_formats import WeightFormat

F16_WEIGHT_LIMIT = 15.0        # max |w| of a weight multiplied in f16 (see the module docstring)
# K steps of 32 (two f16 runs of 16 per workgroup-memory step): +2-6% over 16 at 4 of 6 sweep shapes, -1 to -3% at
# two (bench/results/matmul-h200-sweep.json).
F16_DEFAULT_KERNEL = GemmKernel(32)
F16_FORMATS = (WeightFormat.F16, WeightFormat.BF16)


def held_abs_max(raw: np.ndarray, fmt: WeightFormat) -> float:
    """max |w| of a weight from its stored bytes (uint8 [rows, bytes per row] as WeightSource.as_format gives),
    for f16 and bf16; inf when any value is not finite (such a weight never takes f16 math)."""
    if fmt not in F16_FORMATS:
        raise ValueError(f"held_abs_max reads f16 and bf16 weights, not {fmt.name.lower()}")
    data = np.ascontiguousarray(raw).view(np.uint16).ravel()
    if data.size == 0:
        return 0.0
    # Sign-magnitude: without the sign bit, the bits of finite values order as their magnitudes do, so one
    # integer pass finds the largest (billions of weights at load); an all-ones exponent is inf or NaN.
    top = int((data & 0x7FFF).max())
    if top >= (0x7C00 if fmt == WeightFormat.F16 else 0x7F80):
        return float("inf")
    if fmt == WeightFormat.F16:
        return float(np.array([top], np.uint16).view(np.float16)[0])
    return float(np.array([top << 16], np.uint32).view(np.float32)[0])


def f16_math_ok(fmt: WeightFormat, abs_max: float | None) -> bool:
    """Whether a frozen weight held in `fmt` with largest |value| `abs_max` may be multiplied in f16."""
    return fmt in F16_FORMATS and abs_max is not None and abs_max <= F16_WEIGHT_LIMIT


class MatmulF16:
    """One bound half-precision-math product (linear_f16.wgsl); the interface of linear.Matmul.

    `row_scale`: a scratch of at least M floats (shared by every product of a backend: each encode rewrites
    it before its GEMM reads it). `partials`: linear.Matmul's split-K scratch, finished by linear.wgsl's
    matmul_reduce (the same Params).
    """

    def __init__(self, ctx: GpuContext, c, a, b, shape: GemmShape, row_scale, alpha: float = 1.0,
                 beta: float = 0.0, bias=None, partials=None, tile: tuple[int, int] | None = None,
                 label: str = "matmul_f16", b_format: WeightFormat | str = WeightFormat.F16,
                 group_m: int = GROUP_M, kernel: GemmKernel | None = None):
        b_format = WeightFormat.parse(b_format)
        if not ctx.has_f16:
            raise ValueError(f"{label}: f16 math needs an adapter with shader-f16; {ctx.label} has none "
                             "(use math f32)")
        if b_format not in F16_FORMATS:
            raise ValueError(f"{label}: f16 math needs a weight held f16 or bf16, got {b_format.name.lower()}")
        if shape.trans_a:
            raise ValueError(f"{label}: f16 math computes x·Wᵀ and dy·W; A stored transposed is not one of them")
        row_scale_floats = (row_scale[2] if isinstance(row_scale, tuple) else row_scale.size) // 4
        if row_scale_floats < shape.M:
            raise ValueError(f"{label}: row_scale holds {row_scale_floats} floats, the product has {shape.M} rows")
        self.ctx = ctx
        self.shape = shape
        kernel = kernel or F16_DEFAULT_KERNEL
        if kernel.bk not in (16, 32) or kernel.double or kernel.prefetch or kernel.frag or kernel.diag:
            raise ValueError(f"{label}: the f16-math GEMM walks K in steps of 16 or 32 with one stage, not {kernel}")
        if tile is None:
            family = "linear_f16" if kernel == F16_DEFAULT_KERNEL else f"linear_f16 {kernel.name}"
            def trial(scratch, trial_tile, split, whole_partials=partials):
                return MatmulF16(ctx, scratch, a, b, shape, row_scale, alpha, beta, bias,
                                 whole_partials if split else None, tile=trial_tile, label=f"{label}.tune",
                                 b_format=b_format, group_m=group_m, kernel=kernel)
            tile, partials = measured_plan(tuned_plan(ctx, family, shape, partials, b_format, trial), partials)
        self.kernel = kernel
        self.tile, self.splits, k_chunk, self.vec_a, self.vec_b = gemm_plan(shape, partials, tile)
        reduce_groups = grid_1d(ctx, shape.M * shape.N)
        self.pipeline = ctx.pipeline("linear_f16", "matmul", {
            "TRANS_B": int(shape.trans_b), "WIDE": int(self.tile[0] == 128), "WIDE_N": int(self.tile[1] == 128),
            "VEC_A": int(self.vec_a), "VEC_B": int(self.vec_b), "B_BF16": int(b_format == WeightFormat.BF16),
            "GROUP_M": group_m, "BK": kernel.bk, "WARP_8X4": int(kernel.warp_8x4)})
        self.scales = ctx.pipeline("linear_f16", "row_scales")
        params = pack_gemm_params(shape, alpha, beta, bias is not None, k_chunk, self.splits, reduce_groups[2])
        self.params = ctx.upload(np.frombuffer(params, np.uint8), f"{label}.params", UNIFORM)
        bias = bias if bias is not None else b
        a, b = _vec_binding(a), _vec_binding(b)
        self.groups = (-(-shape.N // self.tile[1]), -(-shape.M // self.tile[0]), self.splits)
        self.scale_groups = grid_rows(ctx, shape.M)
        out = c if self.splits == 1 else partials
        self.bind_group = ctx.bind_group(self.pipeline, {0: out, 1: a, 2: b, 3: bias, 4: self.params,
                                                         5: row_scale}, label)
        self.scale_bg = ctx.bind_group(self.scales, {1: a, 4: self.params, 5: row_scale}, f"{label}.row_scales")
        self.reduce = SplitKReduce(ctx, c, bias, self.params, partials, reduce_groups, label) \
            if self.splits > 1 else None

    def encode(self, enc: StepEncoder) -> None:
        enc.dispatch(self.scales, self.scale_bg, *self.scale_groups)
        enc.dispatch(self.pipeline, self.bind_group, *self.groups)
        if self.reduce is not None:
            self.reduce.encode(enc)


class LinearF16(Linear):
    """linear.Linear (the frozen projection and its input gradient) with both products multiplied in half
    precision; `row_scale`: MatmulF16's [M] scratch. Build it only where f16_math_ok(weight_format, max |w|)."""
    math = "f16"

    def __init__(self, ctx: GpuContext, *args, row_scale, **kw):
        self.row_scale = row_scale
        super().__init__(ctx, *args, **kw)

    def product(self, ctx, c, a, b, shape: GemmShape, **kw):
        return MatmulF16(ctx, c, a, b, shape, self.row_scale, **kw)
