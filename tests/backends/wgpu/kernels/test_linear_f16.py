"""The half-precision-math GEMM (linear_f16.wgsl) against numpy, on odd shapes, with its stated tolerance.

The tolerance is the arithmetic's own bound, per element: operands rounded to f16 (relative 2^-11 each, after
the exact power-of-two row scale) and at most BK = 16 f16 roundings of a K step's partial sum, each within
2^-11 of that step's Σ|a·w|; the f32 sum across steps adds ~K·2^-24. So |C − A·B| <= 2^-7 · (|A|·|B|) holds
for every element whatever the values' scale, and the typical (RMS) error is far smaller (measured below).
"""
import numpy as np
import pytest

from engine.backends.wgpu.kernels.linear import (
    F16_KERNELS,
    TILES,
    GemmShape,
    upload_weight,
    widen_weight,
)
from engine.backends.wgpu.kernels.linear_f16 import (
    F16_WEIGHT_LIMIT,
    MatmulF16,
    f16_math_ok,
    held_abs_max,
)
from engine.model.weight_formats import WeightFormat

pytestmark = pytest.mark.gpu

BOUND = 2.0 ** -7      # per element, relative to (|A|·|B|): see the module docstring
RMS_BOUND = 2e-3       # relative RMS error vs the product of the held weights (measured 6.6-7.1e-4, lavapipe)


def f16_ctx(ctx):
    if not ctx.has_f16:
        pytest.skip(f"{ctx.label} has no shader-f16")
    return ctx


def check(got, a, w_held, trans_b):
    b = w_held.T if trans_b else w_held
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
    err = np.abs(got - exact)
    assert (err <= BOUND * scale + 1e-30).all(), f"worst error/bound {np.max(err / (BOUND * scale + 1e-30)):.3f}"
    rms = np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(exact ** 2))
    assert rms < RMS_BOUND, rms
    return rms


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("M,N,K,a_scale", [(5, 67, 19, 1.0), (70, 129, 37, 1e-7), (131, 66, 45, 3e4)])
def test_matmul_f16_layouts_and_scales(gpu_device, tile, fmt, trans_b, M, N, K, a_scale):
    """x·Wᵀ (trans_b) and dy·W with f16 or bf16 weights; A at unit scale, at gradient-like 1e-7 (would
    underflow f16 without the row scale) and at 3e4 (16 products would overflow it); alpha, bias and beta."""
    ctx = f16_ctx(gpu_device)
    rng = np.random.default_rng(M * 7 + N + K)
    a = (rng.standard_normal((M, K)) * a_scale).astype(np.float32)
    w = (rng.standard_normal((N, K) if trans_b else (K, N)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) * a_scale
    c0 = rng.standard_normal((M, N)).astype(np.float32) * a_scale
    c = ctx.upload(c0, "c")
    row_scale = ctx.buffer(4 * M, "row_scale")
    mm = MatmulF16(ctx, c, ctx.upload(a, "a"), upload_weight(ctx, w, fmt, "w"), GemmShape(M, N, K, trans_b=trans_b),
                   row_scale, alpha=0.5, beta=1.0, bias=ctx.upload(bias, "bias"), tile=tile, b_format=fmt)
    enc = ctx.encoder()
    mm.encode(enc)
    enc.submit()
    got = (ctx.read(c, count=M * N).reshape(M, N).astype(np.float64) - c0 - bias) / 0.5
    check(got, a, widen_weight(w, fmt), trans_b)


@pytest.mark.parametrize("kernel", F16_KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("tile", [TILES[0], TILES[-1]])
@pytest.mark.parametrize("trans_b", [True, False])
def test_matmul_f16_kernel_variants(gpu_device, kernel, tile, trans_b):
    """Every K step (16, 32: two f16 runs per step) and invocation map gives the product within the bound;
    K = 77 leaves a partial last step of either length, 131×133 partial edge tiles."""
    ctx = f16_ctx(gpu_device)
    rng = np.random.default_rng(11)
    M, N, K = 131, 133, 77
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K) if trans_b else (K, N)) * 0.05).astype(np.float32)
    c = ctx.buffer(4 * M * N, "c")
    mm = MatmulF16(ctx, c, ctx.upload(a, "a"), upload_weight(ctx, w, "bf16", "w"),
                   GemmShape(M, N, K, trans_b=trans_b), ctx.buffer(4 * M, "row_scale"), tile=tile, b_format="bf16",
                   kernel=kernel)
    enc = ctx.encoder()
    mm.encode(enc)
    enc.submit()
    check(ctx.read(c, count=M * N).reshape(M, N), a, widen_weight(w, "bf16"), trans_b)


@pytest.mark.parametrize("trans_b", [True, False])
def test_matmul_f16_split_k_and_unaligned(gpu_device, trans_b):
    """A long K over few rows takes the split-K path (partials finished by linear.wgsl's matmul_reduce); an A
    offset of 1 float and a B offset of 3 halves take the scalar loads."""
    ctx = f16_ctx(gpu_device)
    rng = np.random.default_rng(3)
    M, N, K = 3, 21, 1029
    a = rng.standard_normal(1 + M * K).astype(np.float32)
    w = (rng.standard_normal((N, K) if trans_b else (K, N)) * 0.05).astype(np.float32)
    stored = np.concatenate([np.ones(3, np.float32), w.ravel()])
    c = ctx.buffer(4 * M * N, "c")
    partials = ctx.buffer(4 * (1 << 16), "partials")
    shape = GemmShape(M, N, K, trans_b=trans_b, a_off=1, b_off=3)
    mm = MatmulF16(ctx, c, ctx.upload(a, "a"), upload_weight(ctx, stored, "f16", "w"), shape,
                   ctx.buffer(4 * M, "row_scale"), partials=partials)
    assert mm.splits > 1 and not mm.vec_a and not mm.vec_b
    enc = ctx.encoder()
    mm.encode(enc)
    enc.submit()
    check(ctx.read(c, count=M * N).reshape(M, N), a[1:].reshape(M, K), widen_weight(w, "f16"), trans_b)


def test_f16_math_only_where_the_weight_fits():
    """bf16 reaches 3e38 and f16 65504: a weight beyond F16_WEIGHT_LIMIT (or non-finite, or not 16-bit) keeps
    f32 math rather than overflowing a K step's f16 partial sum."""
    from engine.model.weight_formats import quantize

    small = np.array([[0.5, -14.0], [3.0, 1e-3]], np.float32)
    big = np.array([[0.5, -16.0], [1e5, 0.0]], np.float32)
    for fmt in (WeightFormat.F16, WeightFormat.BF16):
        raw = np.frombuffer(quantize(small, fmt), np.uint8).reshape(2, -1)
        assert held_abs_max(raw, fmt) == 14.0 and f16_math_ok(fmt, held_abs_max(raw, fmt))
    raw = np.frombuffer(quantize(big, WeightFormat.BF16), np.uint8).reshape(2, -1)
    assert held_abs_max(raw, WeightFormat.BF16) == 99840.0      # 1e5 in bf16
    assert not f16_math_ok(WeightFormat.BF16, 99840.0)
    assert not f16_math_ok(WeightFormat.F16, F16_WEIGHT_LIMIT + 1)
    assert not f16_math_ok(WeightFormat.F32, 1.0) and not f16_math_ok(WeightFormat.Q8_0, 1.0)
    inf = np.frombuffer(quantize(np.array([[np.inf, 1.0]], np.float32), WeightFormat.F16), np.uint8)
    assert held_abs_max(inf, WeightFormat.F16) == np.inf


def test_matmul_f16_refuses_what_it_does_not_compute(gpu_device):
    ctx = f16_ctx(gpu_device)
    buf = ctx.buffer(4096, "x")
    with pytest.raises(ValueError, match="weight held f16 or bf16, got f32"):
        MatmulF16(ctx, buf, buf, buf, GemmShape(4, 4, 4, trans_b=True), buf, b_format="f32")
    with pytest.raises(ValueError, match="transposed"):
        MatmulF16(ctx, buf, buf, buf, GemmShape(4, 4, 4, trans_a=True), buf)
    with pytest.raises(ValueError, match="row_scale holds 2 floats"):
        MatmulF16(ctx, buf, buf, buf, GemmShape(4, 4, 4), (buf, 0, 8))
