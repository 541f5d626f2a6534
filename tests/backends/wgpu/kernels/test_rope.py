import numpy as np
import pytest

from engine.backends.wgpu.kernels.rope import Rope
from engine.model.spec import RopeSpec


def rope_reference(x: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """transformers' apply_rotary_pos_emb on [B, T, NH, HD] in float64: x*cos + rotate_half(x)*sin."""
    T, hd = x.shape[1], x.shape[3]
    angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    emb = np.concatenate([angle, angle], axis=-1)               # [T, HD]
    cos, sin = np.cos(emb)[None, :, None, :], np.sin(emb)[None, :, None, :]
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rotated * sin


SHAPES = [  # (B, T, NH, HD, rope)
    (1, 1, 1, 2, RopeSpec(theta=10000.0)),
    (2, 7, 3, 48, RopeSpec(theta=10000.0)),
    (1, 33, 5, 24, RopeSpec(theta=1e6, scaling_type="linear", factor=4.0)),
    (2, 5, 2, 256, RopeSpec(theta=500000.0, scaling_type="llama3", factor=8.0, original_max_position=8192)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,NH,HD,spec", SHAPES)
def test_rope_forward_and_backward_match_reference(gpu_device, B, T, NH, HD, spec):
    rng = np.random.default_rng(HD + T)
    x = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    dy = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    inv_freq = spec.inv_freq(HD)
    ctx = gpu_device
    x_buf, dx_buf = ctx.upload(x, "x"), ctx.upload(dy, "dx")
    rope = Rope(ctx, x_buf, B, T, NH, HD, inv_freq)
    enc = ctx.encoder()
    rope.encode_forward(enc)
    rope.encode_backward(enc, dx_buf)
    enc.submit()
    y = ctx.read(x_buf, count=x.size).reshape(x.shape)
    np.testing.assert_allclose(y, rope_reference(x.astype(np.float64), inv_freq), rtol=1e-5, atol=1e-5)
    # Backward is the transpose of the forward map: <R x, dy> == <x, R^T dy> for every x, dy.
    dx = ctx.read(dx_buf, count=x.size).reshape(x.shape)
    np.testing.assert_allclose(np.vdot(y.astype(np.float64), dy), np.vdot(x.astype(np.float64), dx),
                               rtol=1e-5, atol=1e-4)
    # And the inverse rotation of the rotated x gives x back.
    y_buf = ctx.upload(y, "y")
    enc = ctx.encoder()
    Rope(ctx, y_buf, B, T, NH, HD, inv_freq).encode_backward(enc, y_buf)
    enc.submit()
    np.testing.assert_allclose(ctx.read(y_buf, count=x.size).reshape(x.shape), x, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_scaled_rope_is_yarns_attention_factor_forward_and_backward(gpu_device):
    """yarn: transformers multiplies cos and sin by its attention factor; the backward is that map's transpose."""
    B, T, NH, HD, scale = 2, 11, 3, 20, 1.1386
    spec = RopeSpec(theta=10000.0, scaling_type="yarn", factor=4.0, original_max_position=32,
                    attention_factor=scale)
    inv_freq = spec.inv_freq(HD)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    dy = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    ctx = gpu_device
    x_buf, dx_buf = ctx.upload(x, "x"), ctx.upload(dy, "dx")
    rope = Rope(ctx, x_buf, B, T, NH, HD, inv_freq, scale=spec.attention_factor)
    enc = ctx.encoder()
    rope.encode_forward(enc)
    rope.encode_backward(enc, dx_buf)
    enc.submit()
    y = ctx.read(x_buf, count=x.size).reshape(x.shape)
    np.testing.assert_allclose(y, scale * rope_reference(x.astype(np.float64), inv_freq), rtol=1e-5, atol=1e-5)
    dx = ctx.read(dx_buf, count=x.size).reshape(x.shape)
    np.testing.assert_allclose(np.vdot(y.astype(np.float64), dy), np.vdot(x.astype(np.float64), dx),
                               rtol=1e-5, atol=1e-4)



@pytest.mark.gpu
@pytest.mark.parametrize("B,T,NH,HD,R,scale", [(1, 5, 3, 24, 18, 1.0), (2, 9, 1, 10, 6, 1.6075), (1, 3, 5, 14, 2, 1.0),
                                               (3, 7, 2, 12, 12, 1.0)])
def test_partial_rotary_rotates_the_first_dims_and_passes_the_rest(gpu_device, B, T, NH, HD, R, scale):
    """Phi-3's partial_rotary_factor: each head's first R dims rotate (rotate_half within them, inv_freq [R/2],
    the table scaled as longrope's attention factor scales cos and sin), dims R.. pass unchanged, forward and
    backward (the transposed map)."""
    spec = RopeSpec(theta=10000.0, scaling_type="longrope", original_max_position=4,
                    short_factor=tuple(1.0 + 0.3 * i for i in range(R // 2)),
                    long_factor=tuple(1.5 + 0.7 * i for i in range(R // 2)), attention_factor=scale)
    inv_freq = spec.inv_freq(R, T)
    rng = np.random.default_rng(HD + T + R)
    x = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    dy = rng.standard_normal((B, T, NH, HD)).astype(np.float32)
    ctx = gpu_device
    x_buf, dx_buf = ctx.upload(x, "x"), ctx.upload(dy, "dx")
    rope = Rope(ctx, x_buf, B, T, NH, HD, inv_freq, scale=scale, rotary_dim=R)
    enc = ctx.encoder()
    rope.encode_forward(enc)
    rope.encode_backward(enc, dx_buf)
    enc.submit()
    x64 = x.astype(np.float64)
    want = np.concatenate([scale * rope_reference(x64[..., :R], inv_freq), x64[..., R:]], axis=-1)
    y = ctx.read(x_buf, count=x.size).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    dx = ctx.read(dx_buf, count=x.size).reshape(x.shape)
    np.testing.assert_array_equal(dx[..., R:], dy[..., R:])
    np.testing.assert_allclose(np.vdot(y.astype(np.float64), dy), np.vdot(x64, dx), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_rope_matches_transformers(gpu_device):
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    B, T, NH, HD = 1, 9, 2, 16
    inv_freq = RopeSpec(theta=10000.0).inv_freq(HD)
    x = np.random.default_rng(0).standard_normal((B, T, NH, HD)).astype(np.float32)
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * torch.from_numpy(inv_freq)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[None]
    xt = torch.from_numpy(x).transpose(1, 2)                    # HF wants [B, NH, T, HD]
    expected, _ = apply_rotary_pos_emb(xt, xt, emb.cos(), emb.sin())
    ctx = gpu_device
    buf = ctx.upload(x, "x")
    enc = ctx.encoder()
    Rope(ctx, buf, B, T, NH, HD, inv_freq).encode_forward(enc)
    enc.submit()
    got = ctx.read(buf, count=x.size).reshape(x.shape)
    np.testing.assert_allclose(got, expected.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_rope_refuses_bad_shapes(gpu_device):
    ctx = gpu_device
    with pytest.raises(ValueError, match="even number of rotary dims"):
        Rope(ctx, ctx.buffer(4 * 30, "x"), 1, 2, 1, 15, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="from 2 to head_dim 16, got 18"):
        Rope(ctx, ctx.buffer(4 * 32, "x"), 1, 2, 1, 16, np.zeros(9, np.float32), rotary_dim=18)
    with pytest.raises(ValueError, match="inv_freq has shape"):
        Rope(ctx, ctx.buffer(4 * 32, "x"), 1, 2, 1, 16, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="holds 64 bytes"):
        Rope(ctx, ctx.buffer(64, "x"), 1, 2, 1, 16, np.zeros(8, np.float32))
