
import numpy as np
import pytest

from engine.backends.wgpu.uniforms import uniform_struct
from engine.backends.wgpu.kernels.attention import Attention, tiling, workgroup_bytes


def attention_reference(q, k, v, dout, scale=None, window=None, softcap=None):
    """float64 causal GQA attention: (out [B,T,NH,HD], lse [B,NH,T], dq, dk, dv) by the textbook formulas;
    scores times `scale` (default 1/sqrt(HD)); with `window`, query i sees keys i − window < j <= i; with
    `softcap`, the scaled scores become softcap·tanh(s / softcap) before the mask (Gemma 2)."""
    B, T, NH, HD = q.shape
    scale = 1 / np.sqrt(HD) if scale is None else scale
    ratio = NH // k.shape[2]
    kh = np.repeat(k, ratio, axis=2)                     # [B, T, NH, HD]
    vh = np.repeat(v, ratio, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, kh) * scale
    slope = 1.0
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
        slope = 1 - (s / softcap) ** 2                     # d(capped)/d(score)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (j <= i) & ((i - j < window) if window is not None else True)
    s = np.where(visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    lse = (m + np.log(e.sum(-1, keepdims=True)))[..., 0]  # [B, NH, T]
    p = e / e.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", p, vh)
    dp = np.einsum("bihd,bjhd->bhij", dout, vh)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * slope
    dq = np.einsum("bhij,bjhd->bihd", ds, kh) * scale
    dkh = np.einsum("bhij,bihd->bjhd", ds, q) * scale
    dvh = np.einsum("bhij,bihd->bjhd", p, dout)
    fold = lambda x: x.reshape(B, T, NH // ratio, ratio, HD).sum(3)  # noqa: E731  sum the query heads of a group
    return out, lse, dq, fold(dkh), fold(dvh)


def run_attention(ctx, q, k, v, dout, backward=True, **options):
    B, T, NH, HD = q.shape
    NKV = k.shape[2]
    bufs = {name: ctx.upload(x, name) for name, x in (("q", q), ("k", k), ("v", v), ("dout", dout))}
    for name, n in (("out", q.size), ("lse", B * NH * T), ("dq", q.size), ("dk", k.size), ("dv", k.size)):
        bufs[name] = ctx.buffer(4 * n, name)
    # dq/dk/dv start as garbage to prove the backward overwrites rather than accumulates.
    for name in ("dq", "dk", "dv"):
        ctx.write(bufs[name], np.full(bufs[name].size // 4, 7.0, np.float32))
    attn = Attention(ctx, B, T, NH, NKV, HD, bufs["q"], bufs["k"], bufs["v"], bufs["out"], bufs["lse"],
                     bufs["dout"], bufs["dq"], bufs["dk"], bufs["dv"], **options)
    enc = ctx.encoder()
    attn.encode_forward(enc)
    if backward:
        attn.encode_backward(enc)
    enc.submit()
    got = {name: ctx.read(bufs[name], count=n) for name, n in (
        ("out", q.size), ("lse", B * NH * T), ("dq", q.size), ("dk", k.size), ("dv", k.size))}
    return (got["out"].reshape(q.shape), got["lse"].reshape(B, NH, T), got["dq"].reshape(q.shape),
            got["dk"].reshape(k.shape), got["dv"].reshape(k.shape))


SHAPES = [  # (B, T, NH, NKV, HD): T not a multiple of 16 or of the tile, T = 1, GQA 3, HD 16..256
    (1, 1, 1, 1, 4),
    (2, 19, 3, 1, 48),
    (1, 33, 4, 2, 24),
    (1, 21, 2, 2, 256),
    (1, 40, 6, 2, 64),
    (1, 9, 2, 1, 128),
    (1, 37, 2, 1, 16),     # 16 threads per workgroup
]


def random_inputs(B, T, NH, NKV, HD, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    k = rng.standard_normal((B, T, NKV, HD)).astype(np.float32)
    v = rng.standard_normal((B, T, NKV, HD)).astype(np.float32)
    dout = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    return q, k, v, dout


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,NH,NKV,HD", SHAPES)
def test_attention_forward_and_backward_match_reference(gpu_device, B, T, NH, NKV, HD):
    q, k, v, dout = random_inputs(B, T, NH, NKV, HD, seed=T * HD)
    got = run_attention(gpu_device, q, k, v, dout)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)))
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.gpu
def test_attention_with_the_models_own_scale(gpu_device):
    """Gemma's query_pre_attn_scalar**-0.5 instead of 1/sqrt(HD), forward and backward."""
    q, k, v, dout = random_inputs(1, 11, 4, 2, 20, seed=11)
    scale = 28 ** -0.5
    got = run_attention(gpu_device, q, k, v, dout, scale=scale)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)), scale=scale)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)
    assert np.abs(got[0] - attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)))[0]).max() > 1e-3


WINDOWS = [  # (B, T, NH, NKV, HD, window): windows shorter than a tile (6 rows) and than a block (16 rows),
    # window 1 (each query sees itself only), a window one short of T, GQA 3, several key blocks
    (1, 23, 2, 2, 20, 5),
    (2, 41, 3, 1, 16, 17),
    (1, 37, 4, 2, 24, 1),
    (1, 12, 2, 1, 8, 11),
    (1, 50, 2, 1, 64, 9),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,NH,NKV,HD,window", WINDOWS)
def test_sliding_window_attention_matches_reference(gpu_device, B, T, NH, NKV, HD, window):
    q, k, v, dout = random_inputs(B, T, NH, NKV, HD, seed=T + window)
    got = run_attention(gpu_device, q, k, v, dout, window=window)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)), window=window)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)
    full = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)))
    assert np.abs(got[0] - full[0]).max() > 1e-3          # the window cuts something at these shapes


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(register_rows=8, max_tile_rows=3), dict(max_tile_rows=64)])
def test_sliding_window_with_other_tilings(gpu_device, options):
    """Windows that start mid-tile with short tiles, and one tile longer than T."""
    q, k, v, dout = random_inputs(1, 29, 3, 1, 16, seed=4)
    got = run_attention(gpu_device, q, k, v, dout, window=7, **options)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)), window=7)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.gpu
def test_a_window_as_long_as_the_sequence_runs_the_plain_kernels(gpu_device):
    ctx = gpu_device
    b = ctx.buffer(4 * 1 * 9 * 2 * 8, "b")
    assert Attention(ctx, 1, 9, 2, 2, 8, *[b] * 9, window=9).constants["WINDOW"] == 0
    assert Attention(ctx, 1, 9, 2, 2, 8, *[b] * 9, window=8).constants["WINDOW"] == 8
    assert Attention(ctx, 1, 9, 2, 2, 8, *[b] * 9).constants["WINDOW"] == 0
    with pytest.raises(ValueError, match="sliding window must be at least 1 key, got 0"):
        Attention(ctx, 1, 9, 2, 2, 8, *[b] * 9, window=0)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,NH,NKV,HD,window", [(1, 19, 4, 2, 20, None), (2, 26, 3, 1, 16, 7)])
def test_soft_capped_attention_matches_reference(gpu_device, B, T, NH, NKV, HD, window):
    """Gemma 2's cap·tanh(s / cap) on scores large enough that the cap bends them, with and without a window."""
    q, k, v, dout = random_inputs(B, T, NH, NKV, HD, seed=T)
    q, k = q * 3, k * 3                                  # scaled scores around ±10: tanh far from linear
    got = run_attention(gpu_device, q, k, v, dout, window=window, softcap=5.0)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)), window=window, softcap=5.0)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-5, err_msg=name)
    uncapped = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)), window=window)
    assert np.abs(got[2] - uncapped[2]).max() > 1e-2


@pytest.mark.gpu
def test_attention_matches_torch_sdpa(gpu_device):
    torch = pytest.importorskip("torch")
    B, T, NH, NKV, HD = 1, 13, 6, 2, 32
    q, k, v, dout = random_inputs(B, T, NH, NKV, HD, seed=5)
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).double().requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    ref.backward(torch.from_numpy(dout).transpose(1, 2).double())
    out, _, dq, dk, dv = run_attention(gpu_device, q, k, v, dout)
    for g, w in ((out, ref), (dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        np.testing.assert_allclose(g, w.detach().transpose(1, 2).numpy(), rtol=1e-4, atol=2e-5)


@pytest.mark.gpu
def test_attention_is_stable_for_large_scores(gpu_device):
    """Scores around 1e3: a softmax without the running max would overflow to inf."""
    q, k, v, dout = random_inputs(1, 18, 2, 1, 16, seed=3)
    q, k = q * 40, k * 40
    got = run_attention(gpu_device, q, k, v, dout)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)))
    assert all(np.isfinite(g).all() for g in got)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-3)


def test_tiling_fits_workgroup_memory():
    for budget in (8192, 16384, 49152):
        for hd in range(4, 257, 4):
            c = tiling(hd, budget, max_tile_rows=64)
            assert c["TPR"] * 4 >= c["HD4"] and 1 <= c["BT"] <= 64 and c["WG"] <= 256
            assert workgroup_bytes(c["HD4"], c["TPR"], c["BT"]) <= budget
            assert c["BT"] * c["HD4"] <= 2 * c["WG"]          # two prefetched vec4 per thread and tensor
            capped = tiling(hd, budget, max_tile_rows=64, capped=True)
            assert workgroup_bytes(capped["HD4"], capped["TPR"], capped["BT"], capped=True) <= budget
    assert tiling(64)["BT"] == 6 and tiling(256)["BT"] == 5 and tiling(256, 32768)["BT"] == 6


@pytest.mark.gpu
@pytest.mark.parametrize("options", [dict(max_tile_rows=64), dict(workgroup_budget=4096, max_tile_rows=64),
                                     dict(register_rows=8), dict(register_rows=32, max_tile_rows=3)])
def test_attention_tiling_variants_agree(gpu_device, options):
    """Tiles longer than T (32 rows at HD 16), budget-limited tiles, and 8 or 32 rows per workgroup."""
    q, k, v, dout = random_inputs(1, 45, 3, 1, 16, seed=9)
    got = run_attention(gpu_device, q, k, v, dout, **options)
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v, dout)))
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=2e-5, err_msg=name)


@pytest.mark.gpu
def test_attention_refuses_bad_shapes(gpu_device):
    ctx = gpu_device
    b = ctx.buffer(4096, "b")
    with pytest.raises(ValueError, match="multiple of 4"):
        Attention(ctx, 1, 2, 1, 1, 30, *[b] * 9)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(ctx, 1, 2, 3, 2, 16, *[b] * 9)
    with pytest.raises(ValueError, match="buffer q"):
        Attention(ctx, 1, 64, 2, 1, 16, ctx.buffer(16, "tiny"), *[b] * 8)


def test_params_uniform_is_the_wgsl_struct():
    params = uniform_struct("attention", "Params")
    assert [name for name, _ in params.fields] == ["batch", "seq_len", "n_heads", "n_kv", "ratio", "scale",
                                                   "dsum_stride", "sum_stride"]
    assert dict(params.fields)["scale"] == "f32" and params.nbytes == 32
