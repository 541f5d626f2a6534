import math

import numpy as np
import pytest
import torch

from engine.backends.base import OptimizerConfig
from engine.backends.optimizers import (SIGNED_MAP, UNSIGNED_MAP, HostAdamW, HostAdamW8bit, HostSGD, clip_scale,
                               dynamic_map, global_grad_norm, make_host_optimizer, quantise)

SHAPES = {"a": (3, 5), "b": (17,), "c": (2, 2, 3)}


def random_tensors(rng, scale=1.0):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def run_torch(opt_cls, params0, grads_seq, lrs, max_norm, **kwargs):
    tp = [torch.tensor(p, requires_grad=True) for p in params0.values()]
    opt = opt_cls(tp, lr=lrs[0], **kwargs)
    for grads, lr in zip(grads_seq, lrs):
        for t, g in zip(tp, grads.values()):
            t.grad = torch.tensor(g)
        if max_norm:
            torch.nn.utils.clip_grad_norm_(tp, max_norm)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return {k: t.detach().numpy() for k, t in zip(params0, tp)}


def run_host(opt, params0, grads_seq, lrs, max_norm):
    params = {k: v.copy() for k, v in params0.items()}
    for grads, lr in zip(grads_seq, lrs):
        norm = global_grad_norm(grads.values())
        opt.step(params, grads, lr, grad_scale=clip_scale(norm, max_norm))
    return params


@pytest.mark.parametrize("wd,max_norm", [(0.0, 0.0), (0.1, 1.0)])
def test_host_adamw_matches_torch(wd, max_norm):
    rng = np.random.default_rng(1)
    params0 = random_tensors(rng)
    grads_seq = [random_tensors(rng, scale=s) for s in (0.3, 2.0, 0.01, 1.0, 5.0)]
    lrs = [1e-2, 2e-2, 5e-3, 1e-2, 3e-2]
    want = run_torch(torch.optim.AdamW, params0, grads_seq, lrs, max_norm, betas=(0.9, 0.95), eps=1e-8,
                     weight_decay=wd)
    got = run_host(HostAdamW(OptimizerConfig(beta2=0.95, weight_decay=wd)), params0, grads_seq, lrs, max_norm)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_host_sgd_matches_torch_and_decays_decoupled():
    rng = np.random.default_rng(2)
    params0 = random_tensors(rng)
    grads_seq = [random_tensors(rng) for _ in range(3)]
    want = run_torch(torch.optim.SGD, params0, grads_seq, [0.1, 0.05, 0.2], 0.5)
    got = run_host(HostSGD(OptimizerConfig(name="sgd")), params0, grads_seq, [0.1, 0.05, 0.2], 0.5)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    p = {"w": np.array([2.0], np.float32)}
    HostSGD(OptimizerConfig(name="sgd", weight_decay=0.5)).step(p, {"w": np.array([1.0], np.float32)}, lr=0.1)
    assert p["w"][0] == pytest.approx(2.0 * (1 - 0.05) - 0.1)


def test_dynamic_maps_are_bitsandbytes_shaped():
    for qmap, lo in ((SIGNED_MAP, -0.99296875), (UNSIGNED_MAP, 0.0)):
        assert qmap.shape == (256,) and np.all(np.diff(qmap) > 0)
        assert qmap[-1] == 1.0 and 0.0 in qmap and qmap[0] == pytest.approx(lo)
    assert np.count_nonzero(SIGNED_MAP < 0) == 127 and UNSIGNED_MAP[1] == pytest.approx(3.25e-7)
    np.testing.assert_array_equal(dynamic_map(True), SIGNED_MAP)


def test_quantise_picks_nearest_code():
    x = np.random.default_rng(3).uniform(-1, 1, 5000).astype(np.float32)
    x[:4] = (-1.0, 0.0, 1.0, 1e-9)
    for qmap in (SIGNED_MAP, UNSIGNED_MAP):
        codes = quantise(x, qmap)
        brute = np.abs(x[:, None] - qmap[None, :]).min(axis=1)
        np.testing.assert_array_equal(np.abs(x - qmap[codes]), brute)


def quadratic(rng, n=1500):
    a = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), n)).astype(np.float32)
    target = rng.standard_normal(n).astype(np.float32)
    return a, target


def descend(opt, a, target, steps, lr):
    p = {"w": np.zeros_like(target)}
    losses = []
    for _ in range(steps):
        diff = p["w"] - target
        losses.append(float(0.5 * np.sum(a * diff * diff)))
        opt.step(p, {"w": a * diff}, lr)
        assert np.isfinite(p["w"]).all()
    return np.array(losses)


def test_adamw8bit_descends_a_quadratic_like_adamw():
    a, target = quadratic(np.random.default_rng(4))
    l8 = descend(HostAdamW8bit(OptimizerConfig(name="adamw8bit", block_size=256)), a, target, 150, 0.05)
    l32 = descend(HostAdamW(OptimizerConfig()), a, target, 150, 0.05)
    assert l8[-1] < 0.05 * l8[0]
    assert abs(math.log(l8[-1] / l32[-1])) < math.log(2.0), (l8[-1], l32[-1])
    assert np.all(np.abs(l8[:50] - l32[:50]) <= 0.2 * l32[:50])  # measured: within 10%


def test_adamw8bit_first_step_with_zero_blocks_stays_finite():
    opt = HostAdamW8bit(OptimizerConfig(name="adamw8bit", block_size=8))
    p = {"w": np.ones(20, np.float32)}
    g = np.zeros(20, np.float32)
    g[9] = 3.0
    opt.step(p, {"w": g}, 0.1)
    assert np.isfinite(p["w"]).all() and p["w"][9] == pytest.approx(1 - 0.1, rel=1e-5)
    assert opt.m_scale[0] == 0 and opt.m_scale[1] == pytest.approx(0.3)
    np.testing.assert_array_equal(np.delete(p["w"], 9), 1.0)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "sgd"])
def test_host_state_round_trip_resumes_exactly(name):
    rng = np.random.default_rng(5)
    config = OptimizerConfig(name=name, block_size=8, weight_decay=0.01)
    params0 = random_tensors(rng)
    grads_seq = [random_tensors(rng) for _ in range(4)]
    first = make_host_optimizer(config)
    params = run_host(first, params0, grads_seq[:2], [0.01] * 2, 1.0)
    saved = first.state()
    assert saved["step"].dtype == np.int64 and int(saved["step"]) == 2
    straight = run_host(first, params, grads_seq[2:], [0.01] * 2, 1.0)
    resumed_opt = make_host_optimizer(config)
    resumed_opt.load_state(saved)
    resumed = run_host(resumed_opt, params, grads_seq[2:], [0.01] * 2, 1.0)
    for k in SHAPES:
        np.testing.assert_array_equal(resumed[k], straight[k])
    assert resumed_opt.step_count == 4


def test_host_refuses_mismatched_state_and_sizes():
    opt = HostAdamW(OptimizerConfig())
    with pytest.raises(ValueError, match="keys"):
        opt.load_state({"step": np.array(1), "m": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="'v' is float64"):
        opt.load_state({"step": np.array(1), "m": np.zeros(3, np.float32), "v": np.zeros(3)})
    opt = HostAdamW(OptimizerConfig())
    opt.step({"w": np.zeros(3, np.float32)}, {"w": np.zeros(3, np.float32)}, 0.1)
    with pytest.raises(ValueError, match="holds state for 3 values"):
        opt.step({"w": np.zeros(4, np.float32)}, {"w": np.zeros(4, np.float32)}, 0.1)


@pytest.mark.parametrize("size", [1, 1 << 17, 3 * (1 << 17) + 5, 2_000_001])
def test_split_spans_cover_the_vector_once_in_whole_chunks(size):
    from engine.backends.optimizers import UPDATE_CHUNK, split_spans

    for parts in (1, 2, 3, 8):
        spans = split_spans(size, parts)
        assert spans[0][0] == 0 and spans[-1][1] == size and len(spans) <= parts
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all((end - start) % UPDATE_CHUNK == 0 for start, end in spans[:-1])


def test_threaded_adamw_equals_one_thread_bit_for_bit():
    """The chunked, threaded in-place update (flat API) gives exactly what the dict API on one thread gives."""
    rng = np.random.default_rng(5)
    from engine.backends.optimizers import UPDATE_CHUNK

    size = 3 * UPDATE_CHUNK + 777
    config = OptimizerConfig(weight_decay=0.1)
    params = {"a": rng.standard_normal(size - 100).astype(np.float32),
              "b": rng.standard_normal((10, 10)).astype(np.float32)}
    one, many = HostAdamW(config), HostAdamW(config, size, threads=3)
    flat = np.concatenate([p.ravel() for p in params.values()])
    for step in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        one.step(params, grads, lr=1e-3, grad_scale=0.7)
        many.step_flat(flat, np.concatenate([g.ravel() for g in grads.values()]), lr=1e-3, grad_scale=0.7)
        assert np.array_equal(flat, np.concatenate([p.ravel() for p in params.values()]))
    assert all(np.array_equal(one.state()[k], many.state()[k]) for k in ("m", "v", "step"))
