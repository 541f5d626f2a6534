
import numpy as np
import pytest
import torch

from engine.backends.base import OptimizerConfig
from engine.backends.wgpu.kernels.optimizer import HYPER, GradNorm, Optimizer, pack_hyper
from engine.backends.optimizers import clip_scale, global_grad_norm, make_host_optimizer


class GpuRun:
    """params/grads/stats buffers + GradNorm + Optimizer, stepped like the backend does."""

    def __init__(self, ctx, config, p0):
        self.ctx, self.P = ctx, p0.size
        self.params = ctx.upload(p0, "params")
        self.grads = ctx.buffer(4 * self.P, "grads")
        self.stats = ctx.buffer(64, "stats")
        self.norm = GradNorm(ctx, self.grads, self.P, self.stats)
        self.opt = Optimizer(ctx, config, self.params, self.grads, self.P, self.stats)

    def step(self, g, lr, max_norm, loss=1.0):
        self.ctx.write(self.grads, g.astype(np.float32))
        self.ctx.write(self.stats, np.array([loss], np.float32))
        self.opt.set_hyper(lr, max_norm)
        enc = self.ctx.encoder()
        self.norm.encode(enc)
        self.opt.encode(enc)
        enc.submit()

    def read(self):
        return self.ctx.read(self.params, count=self.P), self.ctx.read(self.stats, count=16)


def host_step(opt, p, g, lr, max_norm, loss=1.0):
    """The CPU backend's step: norm, guard, clip, update. Returns the norm."""
    norm = global_grad_norm([g])
    if np.isfinite(loss) and np.isfinite(norm):
        opt.step({"p": p}, {"p": g.astype(np.float32)}, lr, grad_scale=clip_scale(norm, max_norm))
    return norm


def grads_for(rng, P, steps):
    return [(rng.standard_normal(P) * s).astype(np.float32) for s in np.geomspace(0.05, 5.0, steps)]


@pytest.mark.gpu
@pytest.mark.parametrize("P", [1, 1000])
def test_adamw_matches_torch(gpu_device, P):
    rng = np.random.default_rng(P)
    p0 = rng.standard_normal(P).astype(np.float32)
    config = OptimizerConfig(beta2=0.99, weight_decay=0.05)
    run = GpuRun(gpu_device, config, p0)
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.AdamW([tp], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    max_norm = 3.0
    for i, g in enumerate(grads_for(rng, P, 4)):
        lr = 0.01 * (i + 1)
        run.step(g, lr, max_norm)
        tp.grad = torch.tensor(g)
        want_norm = float(torch.nn.utils.clip_grad_norm_([tp], max_norm))
        topt.param_groups[0]["lr"] = lr
        topt.step()
        got, stats = run.read()
        np.testing.assert_allclose(got, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
        assert stats[1] == pytest.approx(want_norm, rel=1e-5)
        assert stats[2] == pytest.approx(clip_scale(want_norm, max_norm), rel=1e-5)
        assert (stats[3], stats[4]) == (0.0, i + 1)
    np.testing.assert_array_equal(gpu_device.read(run.grads, count=P), 0.0)   # zeroed for the next step
    state = run.opt.state()
    np.testing.assert_allclose(state["m"], topt.state[tp]["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state["v"], topt.state[tp]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.gpu
def test_sgd_matches_torch_and_host(gpu_device):
    rng = np.random.default_rng(7)
    P = 300
    p0 = rng.standard_normal(P).astype(np.float32)
    run = GpuRun(gpu_device, OptimizerConfig(name="sgd"), p0)
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1)
    for g in grads_for(rng, P, 3):
        run.step(g, 0.1, 1.0)
        tp.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([tp], 1.0)
        topt.step()
    np.testing.assert_allclose(run.read()[0], tp.detach().numpy(), rtol=1e-6, atol=1e-7)
    # Decoupled weight decay: compare with the numpy twin.
    config = OptimizerConfig(name="sgd", weight_decay=0.3)
    run, host, p = GpuRun(gpu_device, config, p0), make_host_optimizer(config), p0.copy()
    for g in grads_for(rng, P, 2):
        run.step(g, 0.05, 0.0)
        host_step(host, p, g, 0.05, 0.0)
    np.testing.assert_allclose(run.read()[0], p, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("P,block", [(1003, 256), (4099, 64), (10, 8)])
def test_adamw8bit_matches_numpy_twin(gpu_device, P, block):
    rng = np.random.default_rng(P)
    p0 = rng.standard_normal(P).astype(np.float32)
    config = OptimizerConfig(name="adamw8bit", block_size=block, weight_decay=0.01)
    run, host, p = GpuRun(gpu_device, config, p0), make_host_optimizer(config), p0.copy()
    for i, g in enumerate(grads_for(rng, P, 5)):
        # Gradients over 4 decades within a block, and the second block all zero at step 1 (its scale is 0).
        g = g * np.geomspace(1e-4, 1.0, P).astype(np.float32)[rng.permutation(P)]
        if i == 0:
            g[block:2 * block] = 0.0
        run.step(g, 0.01, 1.0)
        host_step(host, p, g, 0.01, 1.0)
        got, stats = run.read()
        assert np.isfinite(got).all()
        # A code that flips at a rounding midpoint moves that value's next update by a fraction of lr.
        np.testing.assert_allclose(got, p, rtol=1e-5, atol=2e-3 * 0.01)
    gpu, ref = run.opt.state(), host.state()
    assert gpu.keys() == ref.keys() and all(gpu[k].dtype == ref[k].dtype for k in gpu)
    assert int(gpu["step"]) == 5
    np.testing.assert_allclose(gpu["m_scale"], ref["m_scale"], rtol=1e-5)
    np.testing.assert_allclose(gpu["v_scale"], ref["v_scale"], rtol=1e-5)
    # GPU division may round differently from numpy's in the last bit; a code may flip at a midpoint.
    for key in ("m_codes", "v_codes"):
        assert np.mean(gpu[key] == ref[key]) > 0.99, key
        assert np.all(np.abs(gpu[key].astype(int) - ref[key].astype(int)) <= 1), key


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "sgd"])
def test_nonfinite_step_is_skipped_and_grads_still_zeroed(gpu_device, name):
    rng = np.random.default_rng(11)
    P = 520
    config = OptimizerConfig(name=name)
    p0 = rng.standard_normal(P).astype(np.float32)
    run, host, p = GpuRun(gpu_device, config, p0), make_host_optimizer(config), p0.copy()
    g1, g2, g3 = grads_for(rng, P, 3)
    run.step(g1, 0.01, 1.0)
    host_step(host, p, g1, 0.01, 1.0)
    before_params, _ = run.read()
    np.testing.assert_array_equal(gpu_device.read(run.opt.previous, count=P), p0)   # before the applied update
    before_state = run.opt.state()
    bad = g2.copy()
    bad[17] = np.inf
    for g, loss in ((g2, float("nan")), (bad, 1.0), (g2, float("inf"))):
        run.step(g, 0.01, 1.0, loss=loss)
        got, stats = run.read()
        np.testing.assert_array_equal(got, before_params)
        assert stats[3] == 1.0 and stats[4] == 1.0 and stats[2] == 0.0
        np.testing.assert_array_equal(gpu_device.read(run.grads, count=P), 0.0)
        for key, value in run.opt.state().items():
            np.testing.assert_array_equal(value, before_state[key], err_msg=key)
        np.testing.assert_array_equal(gpu_device.read(run.opt.previous, count=P), p0)   # skipped: kept
    run.step(g3, 0.01, 1.0)
    host_step(host, p, g3, 0.01, 1.0)
    got, stats = run.read()
    assert stats[3] == 0.0 and stats[4] == 2.0
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(gpu_device.read(run.opt.previous, count=P), before_params)


@pytest.mark.gpu
def test_grad_norm_is_exact_and_deterministic_past_one_pass(gpu_device):
    ctx = gpu_device
    P = 256 * 1024 + 4321                  # more values than first-pass threads: each thread strides
    g = np.random.default_rng(0).standard_normal(P).astype(np.float32)
    grads, stats = ctx.upload(g, "grads"), ctx.buffer(64, "stats")
    norm = GradNorm(ctx, grads, P, stats)
    results = []
    for _ in range(2):
        enc = ctx.encoder()
        norm.encode(enc)
        enc.submit()
        results.append(ctx.read(stats, count=2)[1])
    assert results[0] == results[1]
    assert results[0] == pytest.approx(np.linalg.norm(g.astype(np.float64)), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "sgd"])
def test_state_round_trip_resumes_exactly_and_moves_to_host(gpu_device, name):
    rng = np.random.default_rng(3)
    P = 777
    config = OptimizerConfig(name=name, block_size=128)
    grads = grads_for(rng, P, 4)
    run = GpuRun(gpu_device, config, rng.standard_normal(P).astype(np.float32))
    for g in grads[:2]:
        run.step(g, 0.02, 1.0)
    mid_params, _ = run.read()
    saved = run.opt.state()
    assert int(saved["step"]) == 2 and saved["step"].dtype == np.int64
    for g in grads[2:]:
        run.step(g, 0.02, 1.0)
    straight, _ = run.read()

    resumed = GpuRun(gpu_device, config, mid_params)
    resumed.opt.load_state(saved)
    for g in grads[2:]:
        resumed.step(g, 0.02, 1.0)
    got, stats = resumed.read()
    np.testing.assert_array_equal(got, straight)
    assert stats[4] == 4.0

    # The same checkpoint drives the numpy optimizer (the CPU backend) to the same place.
    host, p = make_host_optimizer(config), mid_params.copy()
    host.load_state(saved)
    for g in grads[2:]:
        host_step(host, p, g, 0.02, 1.0)
    np.testing.assert_allclose(p, straight, rtol=1e-5, atol=1e-6)


def test_hyper_packs_by_name_at_the_wgsl_offsets():
    raw = pack_hyper(lr=0.5, n=7, blocks_per_row=3)
    assert raw.nbytes == HYPER.nbytes == 64
    assert raw[HYPER.offset("lr"):][:4].view(np.float32)[0] == 0.5
    assert raw[HYPER.offset("n"):][:4].view(np.uint32)[0] == 7 == raw[24:28].view(np.uint32)[0]
    assert raw[HYPER.offset("blocks_per_row"):][:4].view(np.uint32)[0] == 3
    with pytest.raises(ValueError, match="unknown Hyper fields"):
        pack_hyper(learning_rate=1.0)


@pytest.mark.gpu
def test_optimizer_refuses_bad_input(gpu_device):
    ctx = gpu_device
    p, stats = ctx.buffer(64, "p"), ctx.buffer(64, "stats")
    with pytest.raises(ValueError, match="needs 400"):
        Optimizer(ctx, OptimizerConfig(), p, p, 100, stats)
    with pytest.raises(ValueError, match="multiple of 4"):
        Optimizer(ctx, OptimizerConfig(name="adamw8bit", block_size=6), p, p, 4, stats)
    with pytest.raises(ValueError, match="stats buffer"):
        GradNorm(ctx, p, 4, ctx.buffer(16, "small"))
    opt = Optimizer(ctx, OptimizerConfig(), p, p, 4, stats)
    with pytest.raises(ValueError, match="finite"):
        opt.set_hyper(float("nan"), 1.0)
    with pytest.raises(ValueError, match="keys"):
        opt.load_state({"step": np.array(1)})
    assert opt.memory_bytes >= 2 * 4 * 4
