"""RMSNorm forward and input gradient against numpy (and the gradient against torch autograd)."""
import numpy as np
import pytest

from engine.backends.wgpu.kernels.rmsnorm import RmsNorm

pytestmark = pytest.mark.gpu


def rmsnorm_ref(x, w, eps):
    rstd = 1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)
    return (w * x * rstd).astype(np.float32), rstd[:, 0]


@pytest.mark.parametrize("rows,dim", [(1, 1), (1, 72), (7, 24), (33, 130), (3, 300)])
def test_rmsnorm_forward_backward(gpu_device, rows, dim):
    import torch
    ctx = gpu_device
    rng = np.random.default_rng(rows * dim)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    dy = rng.standard_normal((rows, dim)).astype(np.float32)
    dx0 = rng.standard_normal((rows, dim)).astype(np.float32)
    out, rstd, dx = ctx.buffer(4 * x.size, "out"), ctx.buffer(4 * rows, "rstd"), ctx.upload(dx0, "dx")
    norm = RmsNorm(ctx, out, rstd, ctx.upload(x, "x"), ctx.upload(w, "w"), rows, dim, 1e-5,
                   dx=dx, dy=ctx.upload(dy, "dy"), accumulate_dx=True)
    enc = ctx.encoder()
    norm.encode_forward(enc)
    norm.encode_backward(enc)
    enc.submit()
    want, want_rstd = rmsnorm_ref(x, w, 1e-5)
    np.testing.assert_allclose(ctx.read(out, count=x.size).reshape(rows, dim), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctx.read(rstd, count=rows), want_rstd, rtol=1e-5)
    xt = torch.from_numpy(x).double().requires_grad_()
    yt = torch.from_numpy(w).double() * xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + 1e-5)
    yt.backward(torch.from_numpy(dy).double())
    np.testing.assert_allclose(ctx.read(dx, count=x.size).reshape(rows, dim), dx0 + xt.grad.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_rmsnorm_backward_overwrites_without_accumulate(gpu_device):
    ctx = gpu_device
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((2, 5)).astype(np.float32)
    w = np.ones(5, np.float32)
    out, rstd = ctx.buffer(40, "out"), ctx.buffer(8, "rstd")
    dx = ctx.upload(np.full((2, 5), 1e6, np.float32), "dx")
    norm = RmsNorm(ctx, out, rstd, ctx.upload(x, "x"), ctx.upload(w, "w"), 2, 5, 1e-6, dx=dx, dy=ctx.upload(dy, "dy"))
    enc = ctx.encoder()
    norm.encode_forward(enc)
    norm.encode_backward(enc)
    enc.submit()
    assert np.abs(ctx.read(dx, count=10)).max() < 100


def test_overflowed_row_gives_nan_not_zero(gpu_device):
    # x² of 1e20 overflows float32: 1/sqrt(inf) would be 0 and silently zero the row (PyTorch does that); the
    # kernel makes the overflowed row (and a NaN row) NaN so the loss is NaN and the non-finite guard sees it.
    ctx = gpu_device
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 130)).astype(np.float32)
    x[1, 7] = 1e20
    x[2, 100] = np.nan
    x[3] *= 5e17          # large but its mean square (~3e35) is finite: normalised as usual
    w = rng.standard_normal(130).astype(np.float32)
    dy = rng.standard_normal((4, 130)).astype(np.float32)
    out, rstd, dx = ctx.buffer(4 * x.size, "out"), ctx.buffer(16, "rstd"), ctx.buffer(4 * x.size, "dx")
    norm = RmsNorm(ctx, out, rstd, ctx.upload(x, "x"), ctx.upload(w, "w"), 4, 130, 1e-6,
                   dx=dx, dy=ctx.upload(dy, "dy"))
    enc = ctx.encoder()
    norm.encode_forward(enc)
    norm.encode_backward(enc)
    enc.submit()
    y = ctx.read(out, count=x.size).reshape(4, 130)
    r = ctx.read(rstd, count=4)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all() and np.isnan(r[1:3]).all()
    want, want_rstd = rmsnorm_ref(x[[0, 3]], w, 1e-6)
    np.testing.assert_allclose(y[[0, 3]], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r[[0, 3]], want_rstd, rtol=1e-5)
    g = ctx.read(dx, count=x.size).reshape(4, 130)
    assert np.isfinite(g[[0, 3]]).all() and np.isnan(g[1]).all()    # the backward runs on, NaN where it should
