"""SwiGLU and GeGLU (gelu tanh) forward and gradients against torch autograd."""
import numpy as np
import pytest

from engine.backends.wgpu.kernels.swiglu import SwiGlu

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("n", [1, 255, 257, 1000])
def test_swiglu_forward_backward(gpu_device, n, activation):
    import torch
    ctx = gpu_device
    rng = np.random.default_rng(n)
    g, u, dh = (rng.standard_normal(n).astype(np.float32) * 3 for _ in range(3))
    if n > 2:
        g[:2] = (-60.0, 60.0)        # where tanh saturates (e^{2a} overflows f32)
    h, dg, du = (ctx.buffer(4 * n, name) for name in ("h", "dg", "du"))
    k = SwiGlu(ctx, h, ctx.upload(g, "g"), ctx.upload(u, "u"), n, dgate=dg, dup=du, dh=ctx.upload(dh, "dh"),
               activation=activation)
    enc = ctx.encoder()
    k.encode_forward(enc)
    k.encode_backward(enc)
    enc.submit()
    gt, ut = (torch.from_numpy(a).double().requires_grad_() for a in (g, u))
    act = torch.nn.functional.silu if activation == "silu" else (
        lambda x: torch.nn.functional.gelu(x, approximate="tanh"))
    ht = act(gt) * ut
    ht.backward(torch.from_numpy(dh).double())
    np.testing.assert_allclose(ctx.read(h, count=n), ht.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctx.read(dg, count=n), gt.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ctx.read(du, count=n), ut.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_activation_is_refused(gpu_device):
    b = gpu_device.buffer(16, "b")
    with pytest.raises(ValueError, match="activation 'relu' is unknown"):
        SwiGlu(gpu_device, b, b, b, 4, activation="relu")
