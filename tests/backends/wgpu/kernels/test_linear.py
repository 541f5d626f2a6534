"""The tiled GEMM and the frozen linear layer against numpy, on sizes that are not multiples of the 64×64 tile."""
import numpy as np
import pytest

from engine.model.weight_formats import FORMATS, WeightFormat, dequantize, quantize, to_gpu_layout
from engine.backends.wgpu.kernels.linear import (KERNELS, SPLIT_MAX_TILES, SPLIT_MIN_K, SPLIT_TARGET_WORKGROUPS,
                                                   TILES, GemmShape, Linear, Matmul, pack_weight, split_k,
                                                   upload_weight, widen_weight)

pytestmark = pytest.mark.gpu


def run(ctx, *kernels):
    enc = ctx.encoder()
    for k in kernels:
        k(enc)
    enc.submit()


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 67, 19), (65, 3, 130), (70, 129, 17), (131, 133, 33)])
def test_matmul_layouts_alpha_beta(gpu_device, tile, trans_a, trans_b, M, N, K, kernel=None):
    ctx = gpu_device
    rng = np.random.default_rng(M * 1000 + N * 10 + K)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    c = ctx.upload(c0, "c")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), ctx.upload(b, "b"), GemmShape(M, N, K, trans_a, trans_b),
                alpha=0.5, beta=1.0, tile=tile, kernel=kernel)
    assert mm.tile == tile
    run(ctx, mm.encode)
    want = 0.5 * (a.T if trans_a else a) @ (b.T if trans_b else b) + c0
    np.testing.assert_allclose(ctx.read(c, count=M * N).reshape(M, N), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
@pytest.mark.parametrize("tile", [TILES[0], TILES[-1]])
@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False)])   # each operand stored both ways
def test_matmul_kernel_variants(gpu_device, kernel, tile, trans_a, trans_b):
    """Every way of walking K (BK, two stages, register prefetch, fragment prefetch) and of mapping invocations
    (warp 8×4) gives the same product;
    K = 45 leaves a partial last step, 131×133 partial edge tiles."""
    test_matmul_layouts_alpha_beta(gpu_device, tile, trans_a, trans_b, 131, 133, 45, kernel)


@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("M,N,K,b_off", [(37, 53, 129, 0), (66, 131, 18, 4), (5, 70, 33, 3)])
def test_matmul_16_bit_weights(gpu_device, fmt, trans_b, M, N, K, b_off):
    """B stored as f16 / bf16 (two per u32) equals numpy's product of the widened weights; b_off 3 (not a
    multiple of 4) takes the scalar path, odd K or N make a weight row start mid-word."""
    ctx = gpu_device
    rng = np.random.default_rng(M * N + K)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    stored = np.concatenate([rng.standard_normal(b_off).astype(np.float32), w.ravel()])
    c = ctx.buffer(4 * M * N, "c")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), upload_weight(ctx, stored, fmt, "w"),
                GemmShape(M, N, K, trans_b=trans_b, b_off=b_off), b_format=fmt)
    assert mm.vec_b == (b_off % 4 == 0 and (K if trans_b else N) % 4 == 0)
    run(ctx, mm.encode)
    wide = widen_weight(w, fmt)
    want = a @ (wide.T if trans_b else wide)
    np.testing.assert_allclose(ctx.read(c, count=M * N).reshape(M, N), want, rtol=1e-5, atol=1e-4)


BLOCK_FORMATS = [WeightFormat.Q8_0, WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_K, WeightFormat.Q5_K,
                 WeightFormat.Q6_K]


@pytest.mark.parametrize("fmt", BLOCK_FORMATS, ids=lambda f: f.name.lower())
@pytest.mark.parametrize("trans_b", [True, False])
def test_matmul_block_quantized_weights(gpu_device, fmt, trans_b):
    """B held in a GGUF block format (engine.model.weight_formats' GPU layout) and dequantized in the tile load
    equals numpy's product with the dequantized weight: the forward's x·Wᵀ (rows of W are K) and the input
    gradient's dy·W (rows are N); odd M and a partial last tile; a split-K run for the forward."""
    ctx = gpu_device
    rng = np.random.default_rng(fmt.value)
    block = FORMATS[fmt].block_size
    rows, cols = 37, 2 * block                      # W [out, in]; in is whole blocks
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    raw = quantize(w, fmt)
    held = dequantize(raw, fmt, w.shape)
    buf = ctx.upload(to_gpu_layout(raw, fmt, w.shape), "w")
    M = 29
    if trans_b:      # y [M, out] = x [M, in] · Wᵀ
        a = rng.standard_normal((M, cols)).astype(np.float32)
        shape, want = GemmShape(M, rows, cols, trans_b=True), a @ held.T
    else:            # dx [M, in] = dy [M, out] · W
        a = rng.standard_normal((M, rows)).astype(np.float32)
        shape, want = GemmShape(M, cols, rows), a @ held
    partials = ctx.buffer(4 * (1 << 16), "partials") if trans_b else None
    c = ctx.buffer(4 * M * shape.N, "c")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), buf, shape, b_format=fmt, partials=partials)
    run(ctx, mm.encode)
    np.testing.assert_allclose(ctx.read(c, count=M * shape.N).reshape(M, shape.N), want, rtol=1e-5, atol=1e-4)


def test_block_formats_refuse_offsets_and_partial_blocks(gpu_device):
    ctx = gpu_device
    w = ctx.buffer(4096, "w")
    with pytest.raises(ValueError, match="whole matrix of rows of 32-weight blocks"):
        Matmul(ctx, w, w, w, GemmShape(4, 8, 48, trans_b=True), b_format="q8_0")
    with pytest.raises(ValueError, match="b_off 2"):
        Matmul(ctx, w, w, w, GemmShape(4, 8, 64, trans_b=True, b_off=2), b_format="q4_1")


def test_pack_weight_rounds_bf16_to_nearest_even_and_f16_like_numpy():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, 65504.0, 1e-3, np.inf], np.float32)
    bf = widen_weight(x, "bf16")
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1); 1 + 3·2^-8 goes up.
    assert bf.tolist()[:4] == [1.0, 1.0, 1.0 + 2 ** -6, -2.5] and bf[6] == np.inf
    assert np.isnan(widen_weight(np.array([np.nan], np.float32), "bf16")).all()
    assert (widen_weight(x, "f16") == x.astype(np.float16).astype(np.float32)).all()
    words = pack_weight(np.arange(3, dtype=np.float32), "f16")
    assert words.dtype == np.uint32 and len(words) == 2   # three halves padded to two words
    assert (words[0] & 0xFFFF, words[0] >> 16) == (0, 0x3C00)   # element 0 low, element 1 (1.0) high
    with pytest.raises(ValueError, match="weight format 'q8'"):
        pack_weight(x, "q8")


def test_matmul_unaligned_a_takes_the_scalar_path(gpu_device):
    """An A offset of 1 float cannot use vec4 loads; the product is still exact."""
    ctx = gpu_device
    rng = np.random.default_rng(5)
    M, N, K = 9, 21, 37
    a = rng.standard_normal(1 + M * K).astype(np.float32)
    b = rng.standard_normal((N, K)).astype(np.float32)
    c = ctx.buffer(4 * M * N, "c")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), ctx.upload(b, "b"), GemmShape(M, N, K, trans_b=True, a_off=1))
    assert not mm.vec_a
    run(ctx, mm.encode)
    np.testing.assert_allclose(ctx.read(c, count=M * N).reshape(M, N), a[1:].reshape(M, K) @ b.T, rtol=1e-5,
                               atol=1e-5)


def test_matmul_strides_and_offsets_address_a_column_block(gpu_device):
    """The LM head's use: columns [v0, v0+n) of a wider [M, V] matrix, B from a row range of a bigger W."""
    ctx = gpu_device
    rng = np.random.default_rng(0)
    M, V, C, v0, n = 7, 150, 33, 70, 66
    h = rng.standard_normal((M, C)).astype(np.float32)
    w = rng.standard_normal((V, C)).astype(np.float32)
    logits = ctx.buffer(4 * M * V, "logits")
    mm = Matmul(ctx, logits, ctx.upload(h, "h"), ctx.upload(w, "w"),
                GemmShape(M, n, C, trans_b=True, ldc=V, c_off=v0, b_off=v0 * C))
    run(ctx, mm.encode)
    got = ctx.read(logits, count=M * V).reshape(M, V)
    np.testing.assert_allclose(got[:, v0:v0 + n], h @ w[v0:v0 + n].T, rtol=1e-5, atol=1e-5)
    assert not got[:, :v0].any() and not got[:, v0 + n:].any()


@pytest.mark.parametrize("M,fin,fout,bias", [(1, 72, 24, True), (13, 80, 136, False), (66, 17, 65, True)])
@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_linear_forward_and_input_gradient(gpu_device, M, fin, fout, bias, fmt):
    ctx = gpu_device
    rng = np.random.default_rng(M + fin)
    x = rng.standard_normal((M, fin)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32) if bias else None
    dy = rng.standard_normal((M, fout)).astype(np.float32)
    dx0 = rng.standard_normal((M, fin)).astype(np.float32)
    out, dx = ctx.buffer(4 * M * fout, "out"), ctx.upload(dx0, "dx")
    lin = Linear(ctx, out, ctx.upload(x, "x"), upload_weight(ctx, w, fmt, "w"),
                 ctx.upload(b, "b") if bias else None, M, fin, fout, dy=ctx.upload(dy, "dy"), dx=dx,
                 accumulate_dx=True, weight_format=fmt)
    run(ctx, lin.encode_forward, lin.encode_backward)
    w = widen_weight(w, fmt)
    want = x @ w.T + (b if bias else 0)
    np.testing.assert_allclose(ctx.read(out, count=M * fout).reshape(M, fout), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ctx.read(dx, count=M * fin).reshape(M, fin), dx0 + dy @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trans_a,M,N,K,beta", [(True, 5, 70, 3000, 1.0), (True, 16, 24, 777, 0.0),
                                                 (False, 3, 2, 1024, 1.0)])
def test_split_k_matches_unsplit(gpu_device, trans_a, M, N, K, beta):
    """LoRA's dA/dB shape (small C, long K) is split over K and reduced; the sum equals the plain product."""
    ctx = gpu_device
    rng = np.random.default_rng(K)
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    shape = GemmShape(M, N, K, trans_a=trans_a)
    assert split_k(shape, 1 << 20) > 1
    c, partials = ctx.upload(c0, "c"), ctx.buffer(4 << 20, "partials")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), ctx.upload(b, "b"), shape, alpha=0.25, beta=beta, partials=partials)
    assert mm.splits > 1
    run(ctx, mm.encode)
    want = 0.25 * (a.T if trans_a else a) @ b + beta * c0
    np.testing.assert_allclose(ctx.read(c, count=M * N).reshape(M, N), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", TILES)
def test_split_product_with_any_tile(gpu_device, tile):
    """A split product given a tile (the autotune's) splits for that tile's count (more slices for fewer, larger
    tiles) and computes the same product; 64×64 stays the split rule's tile without one."""
    ctx = gpu_device
    rng = np.random.default_rng(5)
    M, N, K = 130, 201, 16651   # 64×64: 12 tiles, 43 slices; 128×64: 8, 64; 128×128: 4, 128 (K / 128 = 130)
    a, b = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
    shape = GemmShape(M, N, K, trans_b=True)
    c, partials = ctx.buffer(4 * M * N, "c"), ctx.buffer(4 << 22, "partials")
    mm = Matmul(ctx, c, ctx.upload(a, "a"), ctx.upload(b, "b"), shape, partials=partials, tile=tile)
    ruled = Matmul(ctx, c, ctx.upload(a, "a"), ctx.upload(b, "b"), shape, partials=partials)
    assert ruled.tile == TILES[-1] and mm.tile == tile and mm.splits > 1
    # (at most split_k's count: K chunks rounded up to whole 16-steps may cover K in fewer)
    assert mm.splits <= split_k(shape, 1 << 22, tile)
    assert tile == TILES[-1] or mm.splits > ruled.splits
    run(ctx, mm.encode)
    want = a.astype(np.float64) @ b.T.astype(np.float64)
    np.testing.assert_allclose(ctx.read(c, count=M * N).reshape(M, N), want, rtol=1e-4, atol=1e-3)


def test_split_k_respects_partial_capacity():
    shape = GemmShape(16, 576, 16384, trans_a=True)
    assert split_k(shape, 16 * 576 * 3) == 3
    assert split_k(shape, 1 << 30) == min(-(-SPLIT_TARGET_WORKGROUPS // 9), 16384 // SPLIT_MIN_K)
    assert split_k(GemmShape(4096, 4096, 4096), 1 << 30) == 1
    assert split_k(GemmShape(16 * 64, SPLIT_MAX_TILES // 16 * 64, 1 << 20), 1 << 30) == 1   # tiles enough
    # A larger tile: fewer tiles, so more slices for the same workgroup target (9 tiles of 64×64, 5 of 128×128).
    assert split_k(shape, 1 << 30, (128, 128)) == min(-(-SPLIT_TARGET_WORKGROUPS // 5), 16384 // SPLIT_MIN_K)


def test_large_tiles_only_for_products_large_enough_to_fill_a_gpu(gpu_device):
    ctx = gpu_device
    buf = ctx.buffer(16, "x")

    def tile(*shape, **kw):
        return Matmul(ctx, buf, buf, buf, GemmShape(*shape, **kw)).tile

    assert tile(16384, 1536, 576, trans_b=True) == (128, 128)      # 1536 tiles of 128×128
    assert tile(4096, 1024, 1024, trans_b=True) == (128, 128)      # 256 tiles: just enough
    assert tile(4096, 576, 576, trans_b=True) == (128, 64)         # 160 of 128×128 too few; 288 of 128×64
    assert tile(16384, 192, 576, trans_b=True) == (128, 64)        # k/v at B=32: 128-column tiles pad 192 to 256
    assert tile(512, 3072, 1024, trans_b=True) == (64, 64)         # 192 tiles of 128×64: too few
    assert tile(16, 49152, 576, trans_b=True) == (64, 64)          # many tiles, but 16 rows: mostly padding
    assert tile(512, 576, 576, trans_b=True) == (64, 64)
