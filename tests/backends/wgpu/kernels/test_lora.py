"""The LoRA branch (forward, dA, dB, dx) against torch autograd; the hash dropout's mask is reproducible and its
backward uses the forward's mask; a group of branches sharing one input (LoraGroup) and a LoRA on a fused
projection (FusedLoraBranch: one A, B's row blocks per member) against numpy."""
import numpy as np
import pytest

from engine.backends.wgpu.uniforms import upload_uniform
from engine.backends.wgpu.kernels.lora import FusedLoraBranch, LoraBranch, LoraDims, LoraGroup

pytestmark = pytest.mark.gpu


def setup(ctx, M, fin, fout, r, seed):
    rng = np.random.default_rng(seed)
    arrays = dict(x=rng.standard_normal((M, fin)), A=rng.standard_normal((r, fin)) * 0.3,
                  B=rng.standard_normal((fout, r)) * 0.3, y0=rng.standard_normal((M, fout)),
                  dy=rng.standard_normal((M, fout)), dx0=rng.standard_normal((M, fin)),
                  gA0=rng.standard_normal((r, fin)), gB0=rng.standard_normal((fout, r)))
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    bufs = dict(y=ctx.upload(arrays["y0"], "y"), u=ctx.buffer(4 * M * r, "u"), x=ctx.upload(arrays["x"], "x"),
                A=ctx.upload(arrays["A"], "A"), B=ctx.upload(arrays["B"], "B"), dy=ctx.upload(arrays["dy"], "dy"),
                dx=ctx.upload(arrays["dx0"], "dx"), gA=ctx.upload(arrays["gA0"], "gA"),
                gB=ctx.upload(arrays["gB0"], "gB"), du=ctx.buffer(4 * M * r, "du"),
                xd=ctx.buffer(4 * M * fin, "xd"), dxd=ctx.buffer(4 * M * fin, "dxd"),
                partials=ctx.buffer(4 << 20, "partials"))
    return arrays, bufs


def make(ctx, dims, bufs, dropout=0.0, step=None):
    return LoraBranch(ctx, dims, bufs["y"], bufs["u"], bufs["x"], bufs["A"], bufs["B"], dy=bufs["dy"],
                      dx=bufs["dx"], grad_a=bufs["gA"], grad_b=bufs["gB"], du=bufs["du"], dropout=dropout, salt=7,
                      step_uniform=step, x_drop=bufs["xd"], dx_drop=bufs["dxd"], partials=bufs["partials"])


def read(ctx, buf, shape):
    return ctx.read(buf, count=int(np.prod(shape))).reshape(shape)


def torch_reference(arrays, s, mask=None):
    import torch
    t = {k: torch.from_numpy(v).double() for k, v in arrays.items()}
    x = t["x"].requires_grad_()
    A, B = t["A"].requires_grad_(), t["B"].requires_grad_()
    xb = x * torch.from_numpy(mask).double() if mask is not None else x
    y = t["y0"] + s * (xb @ A.T) @ B.T
    y.backward(t["dy"])
    return dict(y=y.detach().numpy(), dx=arrays["dx0"] + x.grad.numpy(), gA=arrays["gA0"] + A.grad.numpy(),
                gB=arrays["gB0"] + B.grad.numpy())


@pytest.mark.parametrize("M,fin,fout,r", [(1, 72, 24, 4), (7, 80, 136, 8), (70, 33, 65, 1), (5, 20, 20, 16),
                                          (600, 40, 30, 4)])
def test_lora_branch_matches_autograd(gpu_device, M, fin, fout, r):
    ctx = gpu_device
    arrays, bufs = setup(ctx, M, fin, fout, r, M + fin)
    dims = LoraDims(M, fin, fout, r, scaling=2.0 / r)
    branch = make(ctx, dims, bufs)
    enc = ctx.encoder()
    branch.encode_forward(enc)
    branch.encode_backward(enc)
    enc.submit()
    want = torch_reference(arrays, dims.scaling)
    np.testing.assert_allclose(read(ctx, bufs["y"], (M, fout)), want["y"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read(ctx, bufs["dx"], (M, fin)), want["dx"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read(ctx, bufs["gA"], (r, fin)), want["gA"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read(ctx, bufs["gB"], (fout, r)), want["gB"], rtol=1e-4, atol=1e-5)


def test_lora_dropout_masks_consistently(gpu_device):
    ctx = gpu_device
    M, fin, fout, r, p = 64, 40, 24, 4, 0.25
    arrays, bufs = setup(ctx, M, fin, fout, r, 3)
    step = upload_uniform(ctx, "lora", "Step", "step", seed=1234, p=p)
    dims = LoraDims(M, fin, fout, r, scaling=1.5)
    branch = make(ctx, dims, bufs, dropout=p, step=step)
    enc = ctx.encoder()
    branch.encode_forward(enc)
    branch.encode_backward(enc)
    enc.submit()
    dropped = read(ctx, bufs["xd"], (M, fin))
    keep = dropped != 0
    # Kept values are scaled by 1/(1-p); the drop rate is near p; the mask (recovered from the forward's output)
    # explains every gradient.
    np.testing.assert_allclose(dropped[keep], arrays["x"][keep] / (1 - p), rtol=1e-6)
    assert abs((~keep).mean() - p) < 0.05
    want = torch_reference(arrays, dims.scaling, mask=keep / (1 - p))
    np.testing.assert_allclose(read(ctx, bufs["y"], (M, fout)), want["y"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read(ctx, bufs["dx"], (M, fin)), want["dx"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read(ctx, bufs["gA"], (r, fin)), want["gA"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(read(ctx, bufs["gB"], (fout, r)), want["gB"], rtol=1e-4, atol=1e-5)
    # A new seed draws a new mask; the same seed the same one; p = 0 (evaluation) keeps x as it is.
    for seed, same in ((1234, True), (99, False)):
        ctx.write(step, np.array([seed], np.uint32))
        enc = ctx.encoder()
        branch.drop_fwd(enc)
        enc.submit()
        assert np.array_equal(read(ctx, bufs["xd"], (M, fin)) != 0, keep) == same
    ctx.write(step, np.array([0.0], np.float32), offset=4)
    enc = ctx.encoder()
    branch.drop_fwd(enc)
    enc.submit()
    np.testing.assert_array_equal(read(ctx, bufs["xd"], (M, fin)), arrays["x"])


@pytest.mark.parametrize("M,fin,outs,r", [(7, 33, (20, 12, 12), 4), (70, 24, (65, 9), 1), (5, 19, (3, 7, 5), 3),
                                          (600, 40, (30, 30, 30), 4)])
def test_lora_group_matches_numpy(gpu_device, M, fin, outs, r):
    """The members' y, dA, dB and the shared dx equal n separate branches' (float64 numpy), each starting from
    nonzero y, dx and gradients (all accumulate); r = 1 and r = 3 leave u's column ranges unaligned to vec4."""
    ctx, n, s = gpu_device, len(outs), 0.75
    rng = np.random.default_rng(M + fin + r)

    def rand(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    x, dx0, gA0 = rand(M, fin), rand(M, fin), rand(n * r, fin)
    A = rand(n * r, fin, scale=0.3)
    B, y0, dy, gB0 = ([rand(o, r, scale=0.3) for o in outs], [rand(M, o) for o in outs], [rand(M, o) for o in outs],
                      [rand(o, r) for o in outs])
    up = [ctx.upload(a, f"y{i}") for i, a in enumerate(y0)]
    bufs = {"u": ctx.buffer(4 * M * n * r, "u"), "x": ctx.upload(x, "x"), "A": ctx.upload(A, "A"),
            "dx": ctx.upload(dx0, "dx"), "gA": ctx.upload(gA0, "gA"), "du": ctx.buffer(4 * M * n * r, "du"),
            "partials": ctx.buffer(4 << 20, "partials")}
    gB = [ctx.upload(g, f"gB{i}") for i, g in enumerate(gB0)]
    group = LoraGroup(ctx, LoraDims(M, fin, 0, r, s), list(outs), up, bufs["u"], bufs["x"], bufs["A"],
                      [ctx.upload(b, f"B{i}") for i, b in enumerate(B)], dy=[ctx.upload(d, f"dy{i}") for i, d in
                                                                              enumerate(dy)],
                      dx=bufs["dx"], grad_a=bufs["gA"], grad_b=gB, du=bufs["du"], partials=bufs["partials"])
    enc = ctx.encoder()
    group.encode_forward(enc)
    group.encode_backward(enc)
    enc.submit()
    x64, want_dx, want_gA = x.astype(np.float64), dx0.astype(np.float64), gA0.astype(np.float64)
    for i, o in enumerate(outs):
        Ai = A[i * r:(i + 1) * r].astype(np.float64)
        u = x64 @ Ai.T
        np.testing.assert_allclose(read(ctx, up[i], (M, o)), y0[i] + s * u @ B[i].T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(read(ctx, gB[i], (o, r)), gB0[i] + s * dy[i].T @ u, rtol=1e-4, atol=1e-4)
        du = s * dy[i] @ B[i].astype(np.float64)
        want_gA[i * r:(i + 1) * r] += du.T @ x64
        want_dx += du @ Ai
    np.testing.assert_allclose(read(ctx, bufs["gA"], (n * r, fin)), want_gA, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(read(ctx, bufs["dx"], (M, fin)), want_dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("M,fin,outs,r,p", [(7, 33, (20, 12, 12), 4, 0.0), (5, 19, (3, 7, 5), 3, 0.0),
                                            (70, 24, (65, 9), 1, 0.0), (9, 23, (13, 5, 5), 3, 0.3)])
def test_fused_lora_branch_matches_numpy(gpu_device, M, fin, outs, r, p):
    """One A for all members, B's row blocks theirs (offsets 20, 32 or 3, 10: unaligned to vec4 and to any
    binding): each member's y, the shared dA, each block of dB and dx equal PEFT's one LoRA over the
    concatenated output (float64 numpy), all accumulating onto nonzero values; with dropout, one mask on x
    (recovered from the forward's dropped input) explains every gradient."""
    ctx, s = gpu_device, 0.75
    rng = np.random.default_rng(M + fin + r)

    def rand(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    total = sum(outs)
    x, dx0, A, gA0 = rand(M, fin), rand(M, fin), rand(r, fin, scale=0.3), rand(r, fin)
    B, gB0 = rand(total, r, scale=0.3), rand(total, r)
    y0, dy = [rand(M, o) for o in outs], [rand(M, o) for o in outs]
    ys, gB = [ctx.upload(a, f"y{i}") for i, a in enumerate(y0)], ctx.upload(gB0, "gB")
    bufs = {"x": ctx.upload(x, "x"), "dx": ctx.upload(dx0, "dx"), "gA": ctx.upload(gA0, "gA"),
            "xd": ctx.buffer(4 * M * fin, "xd"), "dxd": ctx.buffer(4 * M * fin, "dxd")}
    step = upload_uniform(ctx, "lora", "Step", "step", seed=77, p=p) if p else None
    branch = FusedLoraBranch(ctx, LoraDims(M, fin, total, r, s), list(outs), ys, ctx.buffer(4 * M * r, "u"),
                             bufs["x"], ctx.upload(A, "A"), ctx.upload(B, "B"),
                             dy=[ctx.upload(d, f"dy{i}") for i, d in enumerate(dy)], dx=bufs["dx"],
                             grad_a=bufs["gA"], grad_b=gB, du=ctx.buffer(4 * M * r, "du"), dropout=p, salt=5,
                             step_uniform=step, x_drop=bufs["xd"], dx_drop=bufs["dxd"],
                             partials=ctx.buffer(4 << 20, "partials"))
    enc = ctx.encoder()
    branch.encode_forward(enc)
    branch.encode_backward(enc)
    enc.submit()
    keep = np.ones_like(x, dtype=np.float64)
    if p:
        dropped = read(ctx, bufs["xd"], (M, fin))
        keep = (dropped != 0) / (1 - p)
        assert 0 < (dropped == 0).mean() < 2 * p
    xb = x.astype(np.float64) * keep
    u = xb @ A.astype(np.float64).T
    dy_all = np.concatenate(dy, axis=1).astype(np.float64)
    y_all = s * u @ B.astype(np.float64).T
    at = 0
    for i, o in enumerate(outs):
        np.testing.assert_allclose(read(ctx, ys[i], (M, o)), y0[i] + y_all[:, at:at + o], rtol=1e-4, atol=1e-5)
        at += o
    du = s * dy_all @ B.astype(np.float64)
    np.testing.assert_allclose(read(ctx, gB, (total, r)), gB0 + s * dy_all.T @ u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(read(ctx, bufs["gA"], (r, fin)), gA0 + du.T @ xb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(read(ctx, bufs["dx"], (M, fin)), dx0 + (du @ A.astype(np.float64)) * keep,
                               rtol=1e-4, atol=1e-5)
