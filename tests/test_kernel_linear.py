"""The tiled GEMM and the frozen linear layer against numpy, on sizes that are not multiples of the 64×64 tile."""
import numpy as np
import pytest

from engine.kernels.linear import KERNELS, SPLIT_MIN_K, TILES, GemmShape, Linear, Matmul, split_k

pytestmark = pytest.mark.gpu


def run(ctx, *kernels):
    enc = ctx.encoder()
    for k in kernels:
        k(enc)
    enc.submit()


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 67, 19), (65, 3, 130), (70, 129, 17), (131, 133, 33)])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"bk{k.bk}{'d' if k.double else ''}{'p' if k.prefetch else ''}")
def test_matmul_layouts_alpha_beta(gpu_device, tile, trans_a, trans_b, M, N, K, kernel):
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
def test_linear_forward_and_input_gradient(gpu_device, M, fin, fout, bias):
    ctx = gpu_device
    rng = np.random.default_rng(M + fin)
    x = rng.standard_normal((M, fin)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32) if bias else None
    dy = rng.standard_normal((M, fout)).astype(np.float32)
    dx0 = rng.standard_normal((M, fin)).astype(np.float32)
    out, dx = ctx.buffer(4 * M * fout, "out"), ctx.upload(dx0, "dx")
    lin = Linear(ctx, out, ctx.upload(x, "x"), ctx.upload(w, "w"), ctx.upload(b, "b") if bias else None,
                 M, fin, fout, dy=ctx.upload(dy, "dy"), dx=dx, accumulate_dx=True)
    run(ctx, lin.encode_forward, lin.encode_backward)
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


def test_split_k_respects_partial_capacity():
    shape = GemmShape(16, 576, 16384, trans_a=True)
    assert split_k(shape, 16 * 576 * 3) == 3
    assert split_k(shape, 1 << 30) == min(-(-256 // 9), 16384 // SPLIT_MIN_K)
    assert split_k(GemmShape(4096, 4096, 4096), 1 << 30) == 1


def test_large_tiles_only_for_products_large_enough_to_fill_a_gpu(gpu_device):
    ctx = gpu_device
    buf = ctx.buffer(16, "x")

    def tile(*shape, **kw):
        return Matmul(ctx, buf, buf, buf, GemmShape(*shape, **kw)).tile

    assert tile(16384, 1536, 576, trans_b=True) == (128, 128)
    assert tile(4096, 576, 576, trans_b=True) == (64, 64)          # 128×128: 160 tiles, too few
    assert tile(16384, 192, 576, trans_b=True) == (64, 64)         # k/v at B=32: 384 tiles of 128×64, too few
    assert tile(65536, 100, 576, trans_b=True) == (128, 64)        # N under 128 columns
    assert tile(16, 49152, 576, trans_b=True) == (64, 64)          # many tiles, but 16 rows: mostly padding
    assert tile(512, 576, 576, trans_b=True) == (64, 64)
