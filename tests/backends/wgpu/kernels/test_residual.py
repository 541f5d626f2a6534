import numpy as np
import pytest

from engine.backends.wgpu.kernels.residual import ResidualAdd


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 255, 257, 1000])
def test_residual_forward_matches_numpy(gpu_device, n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
    ctx = gpu_device
    out = ctx.buffer(4 * n, "out")
    kernel = ResidualAdd(ctx, out, ctx.upload(a, "a"), ctx.upload(b, "b"), n)
    enc = ctx.encoder()
    kernel.encode(enc)
    enc.submit()
    np.testing.assert_array_equal(ctx.read(out, count=n), a + b)
